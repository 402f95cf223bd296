"""The running node: ingress, the scheduler (assembly, dispatch, outbox, retention) and workers.

Exactly one node process may use a data directory: :class:`Node` takes an
exclusive ``flock`` on ``<data_dir>/thighnode.lock``, so the APScheduler jobs
(assembly, outbox sending with backoff, retention) run in one process only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from dicomout.outbox import Outbox, send_pending
from dicomout.sender import Destination
from node_errors import NodeError
from scp.ae import IngressServer, start_ingress
from scp.index import InstanceIndex
from scp.refusals import RefusalLog
from scp.spool import remove_study
from scp.types import IngressConfig
from thighnode.audit import AuditTrail
from thighnode.audit_hooks import IngressEvents, ReceivedAuditor, audit_sent, build_audit_trail
from thighnode.backfill import BackfillStore
from thighnode.corrections import CorrectionStore
from thighnode.jobs import DONE, FINAL_STATES, RUNNING, STATES, Job, JobStore, StudyProgress
from thighnode.metrics import InstanceCounter, MetricsServer, MetricsSnapshot, OutboxBacklog, StageDurations
from thighnode.models import PROMOTED, active_model, record_loaded
from thighnode.priors import PriorFinder, PriorRequests, follow_up_prior
from thighnode.results import ResultsStore
from thighnode.settings import Settings
from thighnode.stores import Stores, open_stores
from thighnode.workflow import SegmenterLike, Workflow

if TYPE_CHECKING:
    from thighnode.compute import CeleryDispatcher

log = logging.getLogger(__name__)

#: In the data directory: held (flock) by the one node process that serves it.
LOCK_FILE = "thighnode.lock"


def data_dir_in_use(data_dir: Path) -> bool:
    """True when a node process holds ``data_dir``'s lock (for commands that need the node running)."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


class NodeStartError(NodeError):
    """The node cannot start (data directory locked, model bundle invalid, port busy...)."""


def destinations_of(settings: Settings) -> dict[str, Destination]:
    """The configured destinations as the sender's type."""
    return {
        d.name: Destination(
            name=d.name,
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            calling_ae_title=settings.node.ae_title,
            timeout_s=settings.node.dimse_timeout_s,
            tls=settings.security.tls if d.tls else None,
        )
        for d in settings.destinations
    }


def ingress_config_of(settings: Settings) -> IngressConfig:
    return IngressConfig(
        ae_title=settings.node.ae_title,
        host=settings.node.host,
        port=settings.node.port,
        spool_dir=settings.spool_dir,
        db_path=settings.db_path,
        allowed_calling_aets=settings.security.allowed_calling_aets,
        allowed_peers=settings.security.allowed_peers,
        min_free_disk_mb=settings.node.min_free_disk_mb,
        acse_timeout_s=settings.node.acse_timeout_s,
        dimse_timeout_s=settings.node.dimse_timeout_s,
        network_timeout_s=settings.node.network_timeout_s,
        maximum_pdu_size=settings.node.max_pdu_bytes,
        maximum_associations=settings.node.max_associations,
        max_element_bytes=settings.security.max_element_bytes,
        max_instance_bytes=settings.security.max_instance_bytes,
        tls=settings.security.tls if settings.security.tls_port else None,
        tls_port=settings.security.tls_port,
        plain_port_enabled=settings.security.plain_port_enabled,
        associate_timeout_s=settings.security.associate_timeout_s,
        max_connections_per_peer=settings.security.max_connections_per_peer,
    )


def build_segmenter(settings: Settings) -> SegmenterLike:
    """The active model (thighnode.models: the promoted one, else ``[model] bundle``), loaded once; what was
    loaded is recorded in ``<data_dir>/models/loaded.json`` for `thighnode status`. Used by the node (local
    backend) and by each `thighnode worker` process (celery backend)."""
    from pipeline.bundle import load_bundle
    from pipeline.inference import Segmenter
    from pipeline.labels import load_label_table

    m = settings.model
    t = time.perf_counter()
    try:
        active = active_model(settings)
        bundle = load_bundle(active.path, load_label_table(), device=m.device)
    except NodeError as exc:
        raise NodeStartError(f"model bundle cannot be used: {exc.message}") from exc
    if active.source == PROMOTED and bundle.weights_sha256 != active.sha256:
        raise NodeStartError(
            f"promoted model {active.path}: models/model.pt has sha256 {bundle.weights_sha256[:12]}, the registry "
            f"promoted {active.sha256[:12]}; the copy was changed: promote the bundle again or roll back"
        )
    segmenter = Segmenter(bundle, device=m.device, sw_batch_size=m.sw_batch_size, overlap=m.overlap,
                          mirror=m.mirror_override, uncertainty=m.uncertainty,
                          uncertainty_samples=m.uncertainty_samples,
                          precision=None if m.precision == "bundle" else m.precision)  # None: the bundle's
    loaded = replace(active, name=bundle.name, version=bundle.version, sha256=bundle.weights_sha256)
    record_loaded(settings.node.data_dir, loaded)
    log.info("model %s %s (weights sha256 %s, %s) loaded in %.2f s (%s)", bundle.name, bundle.version,
             bundle.weights_sha256[:12], active.source, time.perf_counter() - t, segmenter.describe())
    return segmenter


class Node:
    """Ingress + scheduler + workers over one data directory."""

    def __init__(
        self, settings: Settings, *, load_model: bool = True, segmenter: SegmenterLike | None = None
    ) -> None:
        """``segmenter`` replaces the bundle's model (tests, or an embedding application)."""
        self.settings = settings
        self._load_model = load_model and segmenter is None
        self._lock_file: IO[str] | None = None
        self._segmenter: SegmenterLike | None = segmenter
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stopping = threading.Event()
        self._outbox_wake = threading.Event()  # outputs were queued: send them now, not at the next interval
        self._started_at: float | None = None
        self.index: InstanceIndex | None = None
        self.jobs: JobStore | None = None
        self.outbox: Outbox | None = None
        self.results: ResultsStore | None = None
        self.corrections: CorrectionStore | None = None
        self.backfill: BackfillStore | None = None
        self.refusals: RefusalLog | None = None
        self.prior_requests: PriorRequests | None = None
        self.priors: PriorFinder | None = None
        self._ingress: IngressServer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stores: Stores | None = None
        self._workflow: Workflow | None = None
        self.audit: AuditTrail | None = None
        self._received_auditor: ReceivedAuditor | None = None
        self._instances = InstanceCounter()
        self._metrics: MetricsServer | None = None
        self._dispatcher: CeleryDispatcher | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        s.node.data_dir.mkdir(parents=True, exist_ok=True)
        s.spool_dir.mkdir(parents=True, exist_ok=True)
        s.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self.audit = build_audit_trail(s)
        except NodeError as exc:
            self._release_lock()
            raise NodeStartError(exc.message) from exc
        t0 = time.perf_counter()
        stores = self._stores = open_stores(s)
        self.index, self.jobs, self.outbox = stores.index, stores.jobs, stores.outbox
        self.results, self.corrections, self.backfill = stores.results, stores.corrections, stores.backfill
        self.prior_requests, self.priors = stores.prior_requests, stores.priors
        self.index.reconcile(s.spool_dir)
        self._started_at = time.time()
        celery = s.compute.backend == "celery"
        if celery:
            # Jobs left running are in the broker's queue (persistent, unacknowledged): a worker finishes them.
            running = [j.id for j in self.jobs.jobs(state=RUNNING)]
            if running:
                log.info("%d job(s) running on Celery workers: %s", len(running), running)
        else:
            recovered = self.jobs.recover(max_attempts=s.processing.max_job_attempts)
            if recovered:
                log.info("resumed %d job(s) left running by the previous process: %s", len(recovered), recovered)
        if self._load_model and not celery:  # with Celery, each worker process loads the model
            self._segmenter = self._build_segmenter()
        self._workflow = stores.workflow(s, lambda: self._segmenter, on_queued=self.wake_outbox)
        if celery:
            from thighnode.compute import CeleryDispatcher

            self._dispatcher = CeleryDispatcher(s)
        else:
            self._executor = ThreadPoolExecutor(max_workers=s.processing.workers, thread_name_prefix="job")
        self.refusals = RefusalLog(s.database)
        if self.audit is not None:
            self._received_auditor = ReceivedAuditor(self.audit, self.index, self.jobs)
        self._ingress = start_ingress(
            ingress_config_of(s), self.index, IngressEvents(self.audit, self._instances), self.refusals
        )
        tick_s = max(0.2, min(1.0, s.node.quiet_period_s / 4 or 0.2))
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self.tick, "interval", seconds=tick_s, id="assemble", max_instances=1, coalesce=True)
        self._scheduler.add_job(
            self.send_outbox, "interval", seconds=s.outbox.send_interval_s, id="outbox", max_instances=1, coalesce=True
        )
        self._scheduler.add_job(self.purge, "interval", hours=1, id="retention", max_instances=1, coalesce=True)
        if s.prior.query:
            self._scheduler.add_job(
                self.retry_priors, "interval", seconds=min(60.0, s.prior.retry_delay_s), id="priors",
                max_instances=1, coalesce=True,
            )
        self._scheduler.start()
        if s.metrics.enabled:
            self._metrics = MetricsServer(s.metrics.host, s.metrics.port, self.metrics_snapshot, self.health).start()
        if self.audit is not None:
            self.audit.application_started()
        log.info(
            "node %s listening on %s:%d, data in %s, stores in %s, started in %.2f s",
            s.node.ae_title, s.node.host, s.node.port, s.node.data_dir, s.database, time.perf_counter() - t0,
        )

    def stop(self) -> None:
        self._stopping.set()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self._ingress is not None:
            self._ingress.stop()
            self._ingress = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None
        if self._stores is not None:
            self._stores.close()
        if self.refusals is not None:
            self.refusals.close()
        if self.audit is not None:
            self.audit.application_stopped()
            self.audit.close()
            self.audit = None
        self._release_lock()
        log.info("node stopped")

    def _take_lock(self) -> None:
        path = self.settings.node.data_dir / LOCK_FILE
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise NodeStartError(
                f"data directory {self.settings.node.data_dir} is in use by another thighnode process "
                f"(lock {path} is held); one node process per data directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _build_segmenter(self) -> SegmenterLike:
        return build_segmenter(self.settings)

    # -- scheduled work -----------------------------------------------------------------

    def tick(self) -> None:
        """Assembly: create/reopen jobs, promote quiet studies, hand ready jobs to free workers."""
        assert self.index is not None and self.jobs is not None
        try:
            progress = [StudyProgress(a.study_instance_uid, a.last_received_at) for a in self.index.activity()]
            ready = self.jobs.sync(progress, time.time(), self.settings.node.quiet_period_s, started_at=self._started_at)
            if ready and self._received_auditor is not None:
                self._received_auditor.jobs_ready(ready)
            if self._dispatcher is not None:
                self._dispatch(self._dispatcher)
                return
            assert self._executor is not None
            while not self._stopping.is_set():
                with self._busy_lock:
                    if self._busy >= self.settings.processing.workers:
                        return
                    job = self.jobs.claim_next()
                    if job is None:
                        return
                    self._busy += 1
                self._executor.submit(self._run_job, job)
        except Exception:  # noqa: BLE001 - a scheduler job must not die
            log.exception("assembly tick failed")

    def _dispatch(self, dispatcher: CeleryDispatcher) -> None:
        """Celery backend: every ready job goes to the broker's queue; the workers take them one at a time."""
        assert self.jobs is not None
        while not self._stopping.is_set():
            job = self.jobs.claim_next()
            if job is None:
                return
            try:
                dispatcher.send(job)
            except Exception as exc:  # noqa: BLE001 - the broker is away: the job waits for the next tick
                self.jobs.release(job.id, f"not sent to the broker ({type(exc).__name__}: {exc}); retried")
                log.warning("job %d: the broker is unreachable: %s", job.id, exc)
                return

    def _run_job(self, job: Job) -> None:
        assert self._workflow is not None and self.jobs is not None
        try:
            outcome = self._workflow.run(job)
            self.jobs.finish(
                job.id, outcome.state, outcome.reason,
                series_uid=outcome.series_uid, timings_s=outcome.timings_s, result=outcome.result,
            )
            self._after_job(job, outcome.state, outcome.reason)
            if outcome.state == DONE:
                self.wake_outbox()
        except Exception:  # noqa: BLE001
            log.exception("job %d: could not record its outcome", job.id)
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _after_job(self, job: Job, state: str, reason: str) -> None:
        """When the finished study was another study's requested prior, reprocess that study."""
        assert self.prior_requests is not None and self.jobs is not None
        follow_up_prior(self.prior_requests, self.jobs, job.study_uid, state, reason,
                        update_when_prior_arrives=self.settings.prior.update_when_prior_arrives)

    def retry_priors(self) -> int:
        assert self.priors is not None
        try:
            return self.priors.retry_due()
        except Exception:  # noqa: BLE001
            log.exception("prior retrieval retry failed")
            return 0

    def wake_outbox(self) -> None:
        """Run the outbox now (a job queued its outputs) instead of at its next ``send_interval_s`` tick; a
        wake during a run makes that run go round once more, so items queued meanwhile do not wait either."""
        self._outbox_wake.set()
        scheduler = self._scheduler
        if scheduler is not None and not self._stopping.is_set():
            try:
                scheduler.modify_job("outbox", next_run_time=datetime.now(timezone.utc))
            except JobLookupError:  # stopping
                pass

    def send_outbox(self) -> int:
        assert self.outbox is not None
        sent = 0
        try:
            audit = self.audit
            on_sent = None if audit is None else (lambda dest, items: audit_sent(audit, dest, items))
            while True:
                self._outbox_wake.clear()
                sent += send_pending(self.outbox, destinations_of(self.settings), on_sent=on_sent)
                if not self._outbox_wake.is_set() or self._stopping.is_set():
                    return sent
        except Exception:  # noqa: BLE001
            log.exception("outbox run failed")
            return sent

    def purge(self, now: float | None = None) -> int:
        """Retention: delete spooled files of studies idle for longer than keep_received_days
        whose jobs are all final. Returns the number of studies purged. Never touches
        ``<data_dir>/corrected/`` (ground truth from readers' corrections, hard links of its own)."""
        assert self.index is not None and self.jobs is not None
        now = time.time() if now is None else now
        horizon = now - self.settings.retention.keep_received_days * 86400.0
        purged = 0
        for activity in self.index.activity():
            if activity.last_received_at > horizon:
                continue
            jobs = self.jobs.jobs(study_uid=activity.study_instance_uid)
            if any(j.state not in FINAL_STATES for j in jobs):
                continue
            self.index.forget(activity.study_instance_uid)
            remove_study(self.settings.spool_dir, activity.study_instance_uid)
            purged += 1
            log.info("retention: purged study %s (idle since %.0f)", activity.study_instance_uid, activity.last_received_at)
        return purged

    def security_alert(self, peer_address: str, reason: str) -> None:
        """A peer failed a security check outside the ingress handlers (TLS: scp/security.py's
        ``security_alert`` is wired here by the composition root); audited when the trail is on."""
        if self.audit is not None:
            self.audit.security_alert(peer_address, reason)

    # -- monitoring ----------------------------------------------------------------------

    def health(self) -> dict[str, bool]:
        """Component -> running: the DICOM listener and the scheduler (/healthz)."""
        scheduler = self._scheduler
        return {
            "listener": self._ingress is not None and self._ingress.serving,
            "scheduler": scheduler is not None and bool(scheduler.running),
        }

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The figures /metrics reports, read now from the stores and the file systems."""
        assert self.jobs is not None and self.outbox is not None
        now = time.time()
        jobs = dict.fromkeys(STATES, 0) | self.jobs.counts()
        stages = {k: StageDurations(n, total) for k, (n, total) in self.jobs.stage_durations().items()}
        backlog = {b.destination: OutboxBacklog(b.pending, max(0.0, now - b.oldest_created_at))
                   for b in self.outbox.backlog()}
        disk = {}
        for path in (self.settings.node.data_dir, self.settings.spool_dir):
            try:
                disk[str(path)] = shutil.disk_usage(path).free
            except OSError:
                log.warning("metrics: free space of %s not readable", path)
        return MetricsSnapshot(self._instances.value, jobs, stages, backlog, disk, self.health())

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the metrics endpoint listens on, None when it is off."""
        return None if self._metrics is None else self._metrics.address

    def wait(self) -> None:
        """Block until :meth:`stop` is called from a signal handler."""
        while not self._stopping.wait(1.0):
            pass

