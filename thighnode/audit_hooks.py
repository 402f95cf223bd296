"""Where the node's events meet the audit trail and the metrics: built and wired by :class:`thighnode.node.Node`.

- :func:`build_audit_trail`: the :class:`~thighnode.audit.AuditTrail` of ``[audit]`` (file, optional syslog);
- :class:`IngressEvents`: the :class:`scp.observer.IngressObserver` handed to the ingress (refused
  associations and security alerts to the audit trail, stored instances to the metrics counter);
- :class:`ReceivedAuditor`: one "instances received" message per study and sending peer when a study's
  job becomes ready (the study is complete);
- :func:`audit_sent`: the outbox's ``on_sent`` listener, one "results sent" message per study and destination.

Patient ID and name are read here from the DICOM files (our spool, our outputs) for the audit trail only;
they never reach the application log.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

from dicomout.files import read_leading
from dicomout.outbox import OutboxItem
from node_errors import NodeError
from dicomout.sender import Destination
from scp.index import InstanceIndex
from scp.types import ReceivedInstance
from thighnode.audit import AuditSink, AuditTrail, Recipient
from thighnode.audit_sinks import AuditFile, SyslogSender
from thighnode.jobs import JobStore
from thighnode.metrics import InstanceCounter
from thighnode.settings import Settings

log = logging.getLogger(__name__)

_BYTES_PER_MB = 1024 * 1024


class AuditStartError(NodeError):
    """The audit trail's file cannot be created or opened."""


def build_audit_trail(settings: Settings) -> AuditTrail | None:
    """The audit trail ``[audit]`` asks for, or None when it is disabled; its file is opened now, so that a
    node whose audit trail cannot be written does not start."""
    a = settings.audit
    if not a.enabled:
        return None
    audit_file = AuditFile(a.file, max_bytes=max(1, int(a.max_file_mb * _BYTES_PER_MB)), keep=a.keep_files)
    try:
        audit_file.open()
    except OSError as exc:
        raise AuditStartError(
            f"audit.file = {str(a.file)!r}: cannot be created or opened for appending ({exc.strerror or exc}); "
            "allowed: a writable path (its folder is created with mode 0700), or audit.enabled = false"
        ) from None
    sinks: list[AuditSink] = [audit_file]
    if a.syslog_host:
        sinks.append(SyslogSender(a.syslog_host, a.syslog_port, a.syslog_protocol))
    log.info("audit trail: %s%s", a.file,
             f", syslog {a.syslog_protocol}://{a.syslog_host}:{a.syslog_port}" if a.syslog_host else "")
    return AuditTrail(settings.node.ae_title, sinks)


def read_patient(path: Path) -> tuple[str, str]:
    """(PatientID, PatientName) of a DICOM file, ("", "") when it cannot be read."""
    try:
        ds = read_leading(path, 0x00100020)  # up to PatientID: a Deflated SEG is not inflated whole
    except Exception as exc:  # noqa: BLE001 - the audit message is still written, without the patient
        log.warning("audit: patient identifiers of %s not readable (%s)", path.name, type(exc).__name__)
        return "", ""
    return str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or "")


class IngressEvents:
    """The ingress observer: refusals and security alerts to ``audit`` (when on), new instances counted."""

    def __init__(self, audit: AuditTrail | None, counter: InstanceCounter) -> None:
        self._audit = audit
        self._counter = counter

    def association_refused(self, peer_address: str, calling_ae: str, reason: str) -> None:
        if self._audit is not None:
            self._audit.association_refused(peer_address, calling_ae, reason)

    def security_alert(self, peer_address: str, reason: str) -> None:
        if self._audit is not None:
            self._audit.security_alert(peer_address, reason)

    def instance_stored(self, instance: ReceivedInstance) -> None:
        self._counter.add()


class ReceivedAuditor:
    """Audits the instances a study received when its job becomes ready, once per instance.

    The instances counted for a job are those received after the study's previous job (its
    ``received_through``) and after what this auditor already reported for the same job (a job
    reopened by late instances reports only those).
    """

    def __init__(self, audit: AuditTrail, index: InstanceIndex, jobs: JobStore) -> None:
        self._audit = audit
        self._index = index
        self._jobs = jobs
        self._reported_through: dict[int, float] = {}

    def jobs_ready(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            try:
                self._report(job_id)
            except Exception as exc:  # noqa: BLE001 - assembly goes on without this message
                log.error("audit: instances received for job %d could not be reported: %s: %s",
                          job_id, type(exc).__name__, exc if isinstance(exc, OSError) else "")

    def _report(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        earlier = [j for j in self._jobs.jobs(study_uid=job.study_uid) if j.id < job.id]
        since = max((j.received_through for j in earlier), default=-math.inf)
        since = max(since, self._reported_through.get(job_id, -math.inf))
        instances = [i for i in self._index.instances(job.study_uid) if i.received_at > since]
        if not instances:
            return
        self._reported_through[job_id] = max(i.received_at for i in instances)
        patient_id, patient_name = read_patient(instances[0].path)
        by_peer: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        for inst in instances:
            by_peer[(inst.calling_ae, inst.peer_address)][inst.sop_class_uid] += 1
        for (calling_ae, address), counts in sorted(by_peer.items()):
            self._audit.instances_received(job.study_uid, patient_id, counts, calling_ae, address,
                                           patient_name=patient_name)


def audit_sent(audit: AuditTrail, destination: Destination, items: tuple[OutboxItem, ...]) -> None:
    """The outbox's listener: one "results sent" message per study among the confirmed ``items``."""
    by_study: dict[str, list[OutboxItem]] = defaultdict(list)
    for item in items:
        by_study[item.study_instance_uid].append(item)
    recipient = Recipient(destination.name, destination.ae_title, destination.host, destination.port)
    for study_uid, sent in by_study.items():
        patient_id, patient_name = read_patient(sent[0].path)
        counts = Counter(item.sop_class_uid for item in sent)
        audit.results_sent(study_uid, patient_id, recipient, counts, patient_name=patient_name)
