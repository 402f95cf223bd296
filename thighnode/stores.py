"""The node's stores and the workflow wired to them, opened one way for the node and for a Celery worker.

``thighnode serve`` (:class:`thighnode.node.Node`) and ``thighnode worker`` (:class:`thighnode.compute.JobRunner`)
run the same :class:`~thighnode.workflow.Workflow` over the same tables ([storage] database: the SQLite file in
the data directory or PostgreSQL); :func:`open_stores` opens them and :meth:`Stores.workflow` wires the workflow,
so the two processes cannot drift apart in what the workflow sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicomout.outbox import Outbox, RetryPolicy
from scp.index import InstanceIndex
from thighnode.backfill import BackfillStore
from thighnode.corrections import CorrectionStore
from thighnode.jobs import JobStore
from thighnode.priors import PriorFinder, PriorRequests
from thighnode.results import ResultsStore
from thighnode.settings import Settings
from thighnode.workflow import SegmenterLike, Workflow


def retry_policy_of(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        base_delay_s=max(settings.outbox.base_delay_s, 0.001),
        max_delay_s=max(settings.outbox.max_delay_s, settings.outbox.base_delay_s, 0.001),
        max_attempts=settings.outbox.max_attempts,
        max_age_s=settings.outbox.max_age_days * 86400.0,
    )


@dataclass(frozen=True)
class Stores:
    """The stores a job's workflow reads and writes, open on ``settings.database``."""

    index: InstanceIndex
    jobs: JobStore
    outbox: Outbox
    results: ResultsStore
    corrections: CorrectionStore
    prior_requests: PriorRequests
    priors: PriorFinder
    backfill: BackfillStore  # a --no-send backfill's studies keep their outputs

    def workflow(self, settings: Settings, segmenter: Callable[[], SegmenterLike | None],
                 on_queued: Callable[[], None] | None = None) -> Workflow:
        """``on_queued``: called when a job has queued an output (the node wakes its sender)."""
        return Workflow(settings, self.index, segmenter, results=self.results, outbox=self.outbox,
                        priors=self.priors, corrections=self.corrections, backfill=self.backfill,
                        on_queued=on_queued)

    def close(self) -> None:
        for store in (self.index, self.jobs, self.outbox, self.results, self.prior_requests, self.corrections,
                      self.backfill):
            close = getattr(store, "close", None)
            if close is not None:
                close()


def open_stores(settings: Settings) -> Stores:
    """Every store on ``settings.database``; the index commits with synchronous NORMAL (the spooled file is
    fsync'ed before its index row is written, and the spool is indexed again at start)."""
    s = settings
    index = InstanceIndex(s.database, synchronous="NORMAL")
    results = ResultsStore(s.database)
    prior_requests = PriorRequests(s.database)
    return Stores(
        index=index, jobs=JobStore(s.database), outbox=Outbox(s.database, retry_policy_of(s)), results=results,
        corrections=CorrectionStore(s.database), prior_requests=prior_requests,
        priors=PriorFinder(s, results, prior_requests, index), backfill=BackfillStore(s.database),
    )
