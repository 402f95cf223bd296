"""Scale-out with Celery (``[compute] backend = "celery"``): the node stays the one scheduler, ``thighnode
worker`` processes do the heavy work of each job.

Who does what:

- The node (``thighnode serve``, one process per data directory) receives, assembles, claims each ready job in
  its job store (ready -> running), and publishes one task per job to ``[compute] queue`` on the RabbitMQ broker
  at ``[compute] broker_url``. The task carries only the job id, the StudyInstanceUID and the data directory.
  The node still sends the outbox and runs retention: it is the only process that C-STOREs to the PACS.
- A worker (``thighnode worker``: prefork pool, concurrency 1) loads the model once per worker process
  (``worker_process_init``), takes one task at a time (prefetch 1), runs the same :class:`~thighnode.workflow.Workflow`
  as the local backend (select, load, check, segment, measure, compare, build outputs under
  ``<data_dir>/outputs``, queue them in the outbox), records the outcome in the job store (running -> done /
  declined / failed) and only then acknowledges the message (late acknowledgement).
- A worker that dies in a task (SIGKILL, power loss) never acknowledged it: RabbitMQ redelivers the message to
  another worker (``task_reject_on_worker_lost`` does the same when only the pool process dies), which runs the
  job again. The outputs' UIDs are deterministic (:mod:`dicomout.uids`) and the outbox holds one item per
  (destination, SOPInstanceUID), so a redelivered job replaces files and outbox items instead of adding any: the
  PACS gets each object once. A delivery for a job that is no longer running (an earlier delivery finished it
  and died before its acknowledgement) does nothing.

The node learns that a job ended from the job store, not from a result backend (results are ignored): the
workflow writes the instance index, results, corrections and outbox tables of the same database anyway, so the
worker needs the database, and a result message would add a second channel that can disagree with it.

Where workers run depends on ``[storage] database`` (:mod:`scp.db`):

- ``""`` (default): the SQLite file ``<data_dir>/thighnode.db`` in WAL mode. Every process that opens it must be
  on the node's host (WAL needs shared memory between the processes, which NFS does not give between hosts, and
  SQLite's locking over NFS is a known source of corruption): one worker per GPU of that host.
- ``"postgresql://user@host:port/dbname"``: the stores on a PostgreSQL server (:mod:`scp.db_postgres`), so
  workers may run on other hosts. What they share then: the database (its URL; the password in ``PGPASSWORD`` or
  ``~/.pgpass``), the broker, and the data directory at the same path on every host (an NFS export): the workers
  read the spooled CT under ``<data_dir>/spool`` and write ``<data_dir>/outputs``, which the node sends. The job
  claim stays atomic across hosts: a writer transaction holds one PostgreSQL advisory lock, as SQLite's
  ``BEGIN IMMEDIATE`` holds its one write lock.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Queue

from node_errors import NodeError
from thighnode.jobs import RUNNING, Job, JobStore, JobStoreError
from thighnode.priors import PriorRequests, follow_up_prior
from thighnode.settings import Settings
from thighnode.stores import Stores, open_stores
from thighnode.workflow import SegmenterLike, Workflow

log = logging.getLogger(__name__)

TASK_NAME = "thighnode.run_job"
"""The one task: run a claimed job end to end (arguments: job id, StudyInstanceUID, data directory)."""

SegmenterFactory = Callable[[Settings], "SegmenterLike | None"]


class ComputeError(NodeError):
    """A task that cannot run on this worker (another data directory, stores not open)."""


def celery_app(settings: Settings) -> Celery:
    """The Celery application of the node and of its workers: one durable queue, late acknowledgement,
    prefetch 1, a task re-queued when its pool process dies, no result backend (results are in the job store)."""
    c = settings.compute
    app = Celery("thighnode", broker=c.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=c.queue,
        task_queues=(Queue(c.queue, durable=True),),
        task_default_delivery_mode="persistent",
        worker_hijack_root_logger=False,  # logging is set up by thighnode.cli
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    return app


class CeleryDispatcher:
    """The node's side: publish a claimed job to the queue."""

    def __init__(self, settings: Settings) -> None:
        self._app = celery_app(settings)
        self._queue = settings.compute.queue
        self._data_dir = str(settings.node.data_dir)

    def send(self, job: Job) -> str:
        """Publish the task of ``job``; returns the task id. Raises what kombu raises when the broker is away
        (after 3 tries)."""
        result = self._app.send_task(
            TASK_NAME, args=(job.id, job.study_uid, self._data_dir), queue=self._queue,
            retry=True, retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0},
        )
        log.info("job %d: sent to queue %s as task %s", job.id, self._queue, result.id)
        return str(result.id)

    def close(self) -> None:
        self._app.close()


class JobRunner:
    """A worker process's side: the stores, the model and the workflow, opened once per process."""

    def __init__(self, settings: Settings, segmenter_factory: SegmenterFactory) -> None:
        self._settings = settings
        self._segmenter_factory = segmenter_factory
        self._segmenter: SegmenterLike | None = None
        self._stores: Stores | None = None
        self.jobs: JobStore | None = None
        self.prior_requests: PriorRequests | None = None
        self.workflow: Workflow | None = None

    def open(self, **_signal: Any) -> None:
        """Open the stores and load the model (``worker_process_init``: in the pool process, after the fork)."""
        s = self._settings
        t = time.perf_counter()
        stores = self._stores = open_stores(s)
        self.jobs, self.prior_requests = stores.jobs, stores.prior_requests
        self._segmenter = self._segmenter_factory(s)
        self.workflow = stores.workflow(s, lambda: self._segmenter)
        log.info("worker process %d ready in %.2f s (data in %s, stores in %s, model %s)", os.getpid(),
                 time.perf_counter() - t, s.node.data_dir, s.database, "loaded" if self._segmenter is not None else "off")

    def close(self, **_signal: Any) -> None:
        if self._stores is not None:
            self._stores.close()
        self._stores = None

    def run(self, job_id: int, study_uid: str, data_dir: str, *, worker: str = "", redelivered: bool = False) -> dict[str, Any]:
        """Run job ``job_id`` when it is still running in the job store; a no-op for a job already ended."""
        if self.workflow is None or self.jobs is None or self.prior_requests is None:
            raise ComputeError(f"job {job_id}: the worker's stores are not open (worker_process_init did not run)",
                               job_id=job_id, study_uid=study_uid)
        if Path(data_dir) != self._settings.node.data_dir:
            raise ComputeError(
                f"job {job_id}: the task's data directory is {data_dir}, this worker's is "
                f"{self._settings.node.data_dir}; node and workers must use the same [node] data_dir",
                job_id=job_id, study_uid=study_uid,
            )
        delivery = "redelivered" if redelivered else "first delivery"
        job = self.jobs.get(job_id)
        if job.state != RUNNING:
            log.info("job %d: task on %s (%s) for a job already %s: nothing to do", job_id, worker, delivery, job.state)
            return {"job_id": job_id, "state": job.state, "ran": False}
        log.info("job %d: task started on %s (%s, attempt %d)", job_id, worker, delivery, job.attempts)
        if self._settings.compute.debug_task_delay_s:
            time.sleep(self._settings.compute.debug_task_delay_s)
        outcome = self.workflow.run(job)
        try:
            self.jobs.finish(job_id, outcome.state, outcome.reason, series_uid=outcome.series_uid,
                             timings_s=outcome.timings_s, result=outcome.result)
        except JobStoreError as exc:  # another delivery of the same job recorded it first
            log.warning("job %d: outcome not recorded on %s: %s", job_id, worker, exc.message)
            return {"job_id": job_id, "state": self.jobs.get(job_id).state, "ran": True}
        follow_up_prior(self.prior_requests, self.jobs, study_uid, outcome.state, outcome.reason,
                        update_when_prior_arrives=self._settings.prior.update_when_prior_arrives)
        log.info("job %d: task ended on %s: %s", job_id, worker, outcome.state)
        return {"job_id": job_id, "state": outcome.state, "ran": True}


def worker_app(settings: Settings, segmenter_factory: SegmenterFactory) -> Celery:
    """The Celery application of a worker: the task bound to a :class:`JobRunner` that each pool process opens
    once (``worker_process_init``) and closes on exit."""
    app = celery_app(settings)
    runner = JobRunner(settings, segmenter_factory)
    worker_process_init.connect(runner.open, weak=False)
    worker_process_shutdown.connect(runner.close, weak=False)

    @app.task(name=TASK_NAME, bind=True)
    def run_job(task: Any, job_id: int, study_uid: str, data_dir: str) -> dict[str, Any]:
        info = task.request.delivery_info or {}
        return runner.run(job_id, study_uid, data_dir, worker=str(task.request.hostname or ""),
                          redelivered=bool(info.get("redelivered")))

    return app


def run_worker(settings: Settings, segmenter_factory: SegmenterFactory, *, name: str = "",
               log_level: str = "INFO") -> None:
    """Run one worker (blocks until SIGTERM/SIGINT): one pool process, one task at a time."""
    hostname = name or f"thighnode-{os.getpid()}@%h"
    app = worker_app(settings, segmenter_factory)
    app.worker_main([
        "worker", "--pool=prefork", "--concurrency=1", f"--queues={settings.compute.queue}",
        f"--hostname={hostname}", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--loglevel={log_level}",
    ])
