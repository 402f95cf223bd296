"""Event handlers of the C-STORE SCP, bound with pynetdicom's ``evt_handlers``.

Each handler is a plain callable; its dependencies come in as extra arguments, e.g.
``(evt.EVT_C_STORE, handle_store, [index, config, association_log, observer])``. Every
association runs on its own thread, so what the handlers share (the index, the
config, the association log) is immutable or thread-safe.

The C-STORE handler implements the Storage Service Class SCP (PS3.4 Annex B): it
never decodes pixel data, writes the bytes as received (the transfer syntax the
sender chose, no transcoding) durably to the spool, records them in the index, and
only then answers Success. It never raises: every failure is logged with the SOP
Instance UID and answered with one of the statuses named in :mod:`scp.status`
(PS3.4 B.2.3, PS3.7 Annex C), with an Error Comment (0000,0902) saying why.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from scp.association import end_associate_phase
from scp.errors import InvalidUIDError
from scp.index import InstanceConflict
from scp.integrity import IntegrityLimits, check_dataset, dataset_sha256, read_part10
from scp.refusals import KIND_ASSOCIATION, KIND_STORE, Refusal, RefusalLog
from scp.security import security_alert
from scp.spool import file_head, write_instance
from scp.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_INVALID_SOP_INSTANCE,
    STATUS_INVALID_UID,
    STATUS_MISSING_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING_ELEMENTS_DISCARDED,
)
from scp.types import IngressConfig, ReceivedInstance
from scp.validate import validate_uid

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from scp.index import InstanceIndex
    from scp.observer import IngressObserver

LOGGER = logging.getLogger(__name__)

# --- A-ASSOCIATE-RJ values (PS3.8 9.3.4) ----------------------------------------------
REJECT_RESULT_PERMANENT = 0x01
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REJECT_DIAG_NO_REASON = 0x01
REJECT_DIAG_CALLING_AE_NOT_RECOGNISED = 0x03
REJECT_DIAG_CALLED_AE_NOT_RECOGNISED = 0x07
REJECT_DIAG_LOCAL_LIMIT_EXCEEDED = 0x02

_BYTES_PER_MB = 1024 * 1024
_ERROR_COMMENT_MAX_CHARS = 64  # LO VR

_MODALITY = 0x00080060
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_HEADER_TAGS: list[BaseTag | int] = [_MODALITY, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID]


@dataclass(frozen=True)
class InstanceHeader:
    """The few attributes of a received dataset the ingress needs (stripped, may be empty)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str


def read_header(fp: BinaryIO, transfer_syntax_uid: str) -> InstanceHeader:
    """Read Modality, StudyInstanceUID and SeriesInstanceUID from an encoded dataset.

    ``fp`` holds the dataset without file meta, encoded in ``transfer_syntax_uid``,
    and is read from its start. Reading stops after (0020,000E); other values are
    skipped, never decoded, and the pixel data is never reached.
    """
    ts = UID(transfer_syntax_uid)
    fp.seek(0)
    if ts.is_deflated:
        # Deflated Explicit VR Little Endian: the whole dataset is one raw deflate stream.
        fp = BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read()))
    ds = read_dataset(
        fp,
        ts.is_implicit_VR,
        ts.is_little_endian,
        stop_when=_past_series_uid,
        specific_tags=_HEADER_TAGS,
    )
    return InstanceHeader(
        study_instance_uid=_text(ds.get(_STUDY_INSTANCE_UID)),
        series_instance_uid=_text(ds.get(_SERIES_INSTANCE_UID)),
        modality=_text(ds.get(_MODALITY)),
    )


def _past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _SERIES_INSTANCE_UID


def _text(element: object) -> str:
    value = getattr(element, "value", None)
    if value is None:
        return ""
    return str(value).strip(" \x00")


class AssociationLog:
    """Counts per association for the one log line written when it closes (thread-safe)."""

    @dataclass
    class _Counts:
        started: float
        calling_ae: str
        called_ae: str
        address: str
        stored: int = 0
        duplicates: int = 0
        failed: int = 0
        bytes_stored: int = 0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, AssociationLog._Counts] = {}

    def opened(self, assoc: Association) -> None:
        counts = AssociationLog._Counts(
            started=time.monotonic(),
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            address=_peer(assoc),
        )
        with self._lock:
            self._open[id(assoc)] = counts

    def count(self, assoc: Association, outcome: str, size_bytes: int = 0) -> None:
        """outcome: "stored", "duplicate" or "failed"."""
        with self._lock:
            counts = self._open.get(id(assoc))
            if counts is None:
                return
            if outcome == "stored":
                counts.stored += 1
                counts.bytes_stored += size_bytes
            elif outcome == "duplicate":
                counts.duplicates += 1
            else:
                counts.failed += 1

    def closed(self, assoc: Association) -> None:
        with self._lock:
            counts = self._open.pop(id(assoc), None)
        if counts is None:
            return  # rejected or never accepted: logged where it was refused
        how = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed"
        LOGGER.info(
            "association %s -> %s from %s %s: %d stored (%.1f MB), %d duplicates, %d failed, %.2f s",
            counts.calling_ae,
            counts.called_ae,
            counts.address,
            how,
            counts.stored,
            counts.bytes_stored / _BYTES_PER_MB,
            counts.duplicates,
            counts.failed,
            time.monotonic() - counts.started,
        )


def handle_echo(event: Event) -> int:
    """C-ECHO (Verification Service Class, PS3.4 Annex A): always Success."""
    return STATUS_SUCCESS


@dataclass(frozen=True)
class _Refusal:
    """A C-STORE we answer with a failure: the named status, its Error Comment (VR LO, 64
    characters) and the whole reason that is recorded (the comment when empty)."""

    status: int
    comment: str
    detail: str = ""


def handle_store(
    event: Event,
    index: InstanceIndex,
    config: IngressConfig,
    association_log: AssociationLog | None = None,
    observer: IngressObserver | None = None,
    refusals: RefusalLog | None = None,
) -> int | Dataset:
    """C-STORE: check the instance, write it durably, record it, then answer Success.

    Order: disk floor, SOP Instance UID check, header (Study/Series UID, Modality),
    integrity (:mod:`scp.integrity`: element and instance sizes, native Pixel Data length;
    pixel data never decoded), duplicate handling, durable write, index record, Success.
    A duplicate SOP Instance with the same bytes is acknowledged without writing; with
    other bytes it replaces a stored copy that fails the integrity check, and otherwise is
    recorded as a conflict and answered with a warning (first copy kept). Every failure is
    recorded in ``refusals``. Never raises.
    """
    assoc = event.assoc
    sop_uid = "<unknown>"

    def refuse(refusal: _Refusal) -> Dataset:
        return _failure(assoc, association_log, refusal, refusals, sop_uid)

    try:
        received_at = time.time()
        request = cast("C_STORE", event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        refusal = _check_free_space(config, sop_uid) or _check_sop_uid(sop_uid)
        if refusal is not None:
            return refuse(refusal)
        transfer_syntax = str(event.context.transfer_syntax)
        header = _read_checked_header(request, transfer_syntax, sop_uid)
        if isinstance(header, _Refusal):
            return refuse(header)
        refusal = _check_integrity(request, transfer_syntax, config, sop_uid)
        if refusal is not None:
            return refuse(refusal)
        stored = index.get_instance(sop_uid)
        if stored is not None:
            return _handle_duplicate(event, index, config, association_log, header, stored, received_at)
        instance = _store_in_spool(event, config, header, sop_uid, received_at)
        is_new = index.record(instance)
        if association_log is not None:
            association_log.count(assoc, "stored" if is_new else "duplicate", instance.size_bytes)
        if is_new and observer is not None:
            _notify(observer.instance_stored, instance)
        return STATUS_SUCCESS
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            LOGGER.error("could not store SOP Instance %s: disk full (%s)", sop_uid, exc)
            return refuse(_Refusal(STATUS_OUT_OF_RESOURCES, "spool disk full"))
        LOGGER.exception("could not store SOP Instance %s", sop_uid)
        return refuse(_Refusal(STATUS_PROCESSING_FAILURE, f"I/O error: {exc.strerror or exc}"))
    except Exception as exc:
        LOGGER.exception("could not store SOP Instance %s", sop_uid)
        return refuse(_Refusal(STATUS_PROCESSING_FAILURE, f"{type(exc).__name__} while storing"))


def _check_integrity(request: C_STORE, transfer_syntax: str, config: IngressConfig, sop_uid: str) -> _Refusal | None:
    """Sizes and native Pixel Data length (:func:`scp.integrity.check_dataset`), or why not."""
    stream = cast("BytesIO", request.DataSet)
    try:
        with stream.getbuffer() as data:
            problem = check_dataset(data, transfer_syntax, config.integrity_limits)
    except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
        LOGGER.warning("refused SOP Instance %s: dataset unreadable (%s: %s)", sop_uid, type(exc).__name__, exc)
        return _Refusal(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed",
                        f"dataset cannot be parsed ({type(exc).__name__}; details in the log)")
    if problem is None:
        return None
    LOGGER.warning("refused SOP Instance %s: %s", sop_uid, problem.reason)
    return _Refusal(problem.status, problem.comment, problem.reason)


def _stored_problem(stored: ReceivedInstance, limits: IntegrityLimits) -> tuple[str, str | None]:
    """(SHA-256 of the stored copy's dataset, why it fails the integrity check or None); a stored
    copy that cannot be read has hash "" and fails."""
    try:
        ts, data = read_part10(stored.path)
    except Exception as exc:  # noqa: BLE001 - a missing or damaged file is an invalid copy
        return "", f"the stored file cannot be read ({type(exc).__name__}: {exc})"
    try:
        problem = check_dataset(data, ts, limits)
    except Exception as exc:  # noqa: BLE001
        return dataset_sha256(data), f"the stored dataset cannot be parsed ({type(exc).__name__})"
    return dataset_sha256(data), None if problem is None else problem.reason


def _handle_duplicate(
    event: Event,
    index: InstanceIndex,
    config: IngressConfig,
    association_log: AssociationLog | None,
    header: InstanceHeader,
    stored: ReceivedInstance,
    received_at: float,
) -> int | Dataset:
    """A SOP Instance already recorded: same bytes = acknowledged; an invalid stored copy is replaced;
    a different valid copy is a conflict (first copy kept, Warning Elements Discarded)."""
    assoc = event.assoc
    sop_uid = stored.sop_instance_uid
    request = cast("C_STORE", event.request)
    with cast("BytesIO", request.DataSet).getbuffer() as data:
        received_sha = dataset_sha256(data)
    stored_sha, stored_problem = _stored_problem(stored, config.integrity_limits)
    if received_sha == stored_sha:
        LOGGER.info("SOP Instance %s already received with the same bytes: acknowledged, not written again", sop_uid)
        if association_log is not None:
            association_log.count(assoc, "duplicate")
        return STATUS_SUCCESS
    if stored_problem is not None and header.study_instance_uid == stored.study_instance_uid:
        instance = _store_in_spool(event, config, header, sop_uid, received_at)
        index.replace(instance)
        if Path(stored.path) != Path(instance.path):
            Path(stored.path).unlink(missing_ok=True)
        LOGGER.warning(
            "SOP Instance %s: the stored copy was replaced by the one from %s (%s)",
            sop_uid, assoc.requestor.ae_title, stored_problem,
        )
        if association_log is not None:
            association_log.count(assoc, "stored", instance.size_bytes)
        return STATUS_SUCCESS
    if stored_problem is not None:
        reason = (
            f"the stored copy is invalid ({stored_problem}) but the new copy names study "
            f"{header.study_instance_uid}, not {stored.study_instance_uid}; first copy kept"
        )
    else:
        reason = "a copy with other bytes is already stored and valid; first copy kept"
    index.record_conflict(
        InstanceConflict(
            at=received_at, sop_instance_uid=sop_uid, study_instance_uid=stored.study_instance_uid,
            calling_ae=assoc.requestor.ae_title, peer_address=_peer(assoc),
            stored_sha256=stored_sha, received_sha256=received_sha, reason=reason,
        )
    )
    LOGGER.warning("SOP Instance %s from %s conflicts with the stored copy: %s", sop_uid, assoc.requestor.ae_title,
                   reason)
    if association_log is not None:
        association_log.count(assoc, "duplicate")
    rsp = Dataset()
    rsp.Status = STATUS_WARNING_ELEMENTS_DISCARDED
    rsp.ErrorComment = "duplicate SOP Instance differs; first copy kept"
    return rsp


def _check_free_space(config: IngressConfig, sop_uid: str) -> _Refusal | None:
    """Out of Resources when the spool's file system is below ``config.min_free_disk_mb``."""
    free_bytes = shutil.disk_usage(config.spool_dir).free
    if free_bytes >= config.min_free_disk_mb * _BYTES_PER_MB:
        return None
    LOGGER.warning(
        "refused SOP Instance %s: %d MB free in %s, the floor is %d MB",
        sop_uid,
        free_bytes // _BYTES_PER_MB,
        config.spool_dir,
        config.min_free_disk_mb,
    )
    return _Refusal(STATUS_OUT_OF_RESOURCES, "spool disk below free-space floor")


def _check_sop_uid(sop_uid: str) -> _Refusal | None:
    try:
        validate_uid(sop_uid, "AffectedSOPInstanceUID")
    except InvalidUIDError as exc:
        LOGGER.warning("refused C-STORE: %s", exc)
        return _Refusal(STATUS_INVALID_SOP_INSTANCE, "invalid Affected SOP Instance UID")
    return None


def _read_checked_header(request: C_STORE, transfer_syntax: str, sop_uid: str) -> InstanceHeader | _Refusal:
    """The dataset's header with valid Study and Series Instance UIDs, or why not."""
    stream = request.DataSet  # BytesIO of the dataset exactly as received
    if stream is None:
        LOGGER.warning("refused SOP Instance %s: the C-STORE request carries no dataset", sop_uid)
        return _Refusal(STATUS_CANNOT_UNDERSTAND, "no dataset in the C-STORE request")
    try:
        header = read_header(stream, transfer_syntax)
    except Exception as exc:  # noqa: BLE001 - any parse error means "cannot understand"
        LOGGER.warning("refused SOP Instance %s: header unreadable (%s: %s)", sop_uid, type(exc).__name__, exc)
        return _Refusal(STATUS_CANNOT_UNDERSTAND, "dataset header cannot be parsed")
    missing = [
        keyword
        for keyword, value in (
            ("StudyInstanceUID", header.study_instance_uid),
            ("SeriesInstanceUID", header.series_instance_uid),
        )
        if not value
    ]
    if missing:
        LOGGER.warning("refused SOP Instance %s: %s missing", sop_uid, " and ".join(missing))
        return _Refusal(STATUS_MISSING_UID, f"{' and '.join(missing)} missing")
    try:
        validate_uid(header.study_instance_uid, "StudyInstanceUID")
        validate_uid(header.series_instance_uid, "SeriesInstanceUID")
    except InvalidUIDError as exc:
        LOGGER.warning("refused SOP Instance %s: %s", sop_uid, exc)
        return _Refusal(STATUS_INVALID_UID, "invalid Study or Series Instance UID")
    return header


def _store_in_spool(
    event: Event, config: IngressConfig, header: InstanceHeader, sop_uid: str, received_at: float
) -> ReceivedInstance:
    """Write the dataset as received, behind its File Meta Information, durably to the spool."""
    assoc = event.assoc
    request = cast("C_STORE", event.request)
    stream = cast("BytesIO", request.DataSet)
    calling_ae = assoc.requestor.ae_title
    head = file_head(event.file_meta, calling_ae)
    with stream.getbuffer() as dataset:  # no copy of the (large) dataset
        path = write_instance(
            config.spool_dir,
            header.study_instance_uid,
            header.series_instance_uid,
            sop_uid,
            (head, dataset),
        )
        size_bytes = len(head) + len(dataset)
    return ReceivedInstance(
        sop_instance_uid=sop_uid,
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        modality=header.modality,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=path,
        size_bytes=size_bytes,
        calling_ae=calling_ae,
        peer_address=_peer(assoc),
        received_at=received_at,
    )


def _failure(
    assoc: Association,
    association_log: AssociationLog | None,
    refusal: _Refusal,
    refusals: RefusalLog | None = None,
    sop_uid: str = "",
) -> Dataset:
    if association_log is not None:
        association_log.count(assoc, "failed")
    if refusals is not None:
        refusals.record(
            Refusal(
                at=time.time(), kind=KIND_STORE, calling_ae=assoc.requestor.ae_title, peer_address=_peer(assoc),
                status=refusal.status, reason=refusal.detail or refusal.comment,
                sop_instance_uid=sop_uid if sop_uid != "<unknown>" else "",
            )
        )
    rsp = Dataset()
    rsp.Status = refusal.status
    rsp.ErrorComment = refusal.comment[:_ERROR_COMMENT_MAX_CHARS]
    return rsp


def _peer(assoc: Association) -> str:
    return str(assoc.requestor.address)


def _notify(call: Callable[..., None], *args: object) -> None:
    """Call an observer's method; a failure there is logged and never reaches pynetdicom."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the observer must not break the association
        LOGGER.exception("ingress observer %s failed", getattr(call, "__name__", call))


def handle_requested(
    event: Event, config: IngressConfig, observer: IngressObserver | None = None, refusals: RefusalLog | None = None
) -> None:
    """A-ASSOCIATE-RQ received: refuse peers outside ``config.allowed_peers``, and make
    every accepted context take the sender's first proposed transfer syntax.

    Called and calling AE titles are checked by pynetdicom itself right after this
    (``AE.require_called_aet`` / ``AE.require_calling_aet``); see :func:`handle_rejected`.
    """
    assoc = event.assoc
    end_associate_phase(assoc)
    address = _peer(assoc)
    if not config.peer_allowed(address):
        rq = assoc.requestor.primitive
        LOGGER.warning(
            "rejected association from %s:%s (calling AE %s, called AE %s): peer address not in allowed_peers",
            address,
            assoc.requestor.port,
            getattr(rq, "calling_ae_title", "?"),
            getattr(rq, "called_ae_title", "?"),
        )
        if observer is not None:
            calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
            _notify(observer.association_refused, address, calling, "peer address not in allowed_peers")
            _notify(observer.security_alert, address, f"peer address {address} not in allowed_peers (calling AE {calling})")
        _record_association_refusal(
            refusals, getattr(rq, "calling_ae_title", "?"), address, "peer address not in allowed_peers"
        )
        security_alert(address, "association rejected: peer address not in allowed_peers")
        assoc.acse.send_reject(REJECT_RESULT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_DIAG_NO_REASON)
        assoc.kill()  # waits for the peer to close after reading the A-ASSOCIATE-RJ
        return
    prefer_requestor_transfer_syntaxes(assoc)


def prefer_requestor_transfer_syntaxes(assoc: Association) -> None:
    """Order each supported context's transfer syntaxes as the requestor proposed them.

    pynetdicom's acceptor takes, for each proposed context, the first of the
    *acceptor's* transfer syntaxes that the requestor proposed. Reordering this
    association's copy of the supported contexts to follow the requestor's order
    makes it accept the sender's first proposed syntax that we support, so what we
    store is what the sender chose (PS3.8 9.3.3.2 leaves the choice to the acceptor).
    """
    primitive = assoc.requestor.primitive
    if primitive is None:
        return
    proposed: dict[str, list[str]] = {}
    for cx in primitive.presentation_context_definition_list:
        order = proposed.setdefault(str(cx.abstract_syntax), [])
        order.extend(ts for ts in cx.transfer_syntax if ts not in order)
    for cx in assoc.acceptor.supported_contexts:
        wanted = proposed.get(str(cx.abstract_syntax))
        if not wanted:
            continue
        ours = list(cx.transfer_syntax)
        first: list[str | bytes | UID] = [UID(ts) for ts in wanted if ts in ours]
        cx.transfer_syntax = first + [ts for ts in ours if ts not in first]


def _record_association_refusal(refusals: RefusalLog | None, calling_ae: object, address: str, reason: str) -> None:
    if refusals is None:
        return
    calling = calling_ae.decode("ascii", "replace") if isinstance(calling_ae, bytes) else str(calling_ae)
    refusals.record(
        Refusal(at=time.time(), kind=KIND_ASSOCIATION, calling_ae=calling.strip(), peer_address=address,
                status=None, reason=f"association rejected: {reason}")
    )


def handle_rejected(event: Event, observer: IngressObserver | None = None, refusals: RefusalLog | None = None) -> None:
    """pynetdicom rejected an association (AE titles, association limit): log who and why, record it in
    ``refusals`` and tell ``observer`` (a calling AE title outside allowed_calling_aets is also a security alert)."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    rj = assoc.acceptor.primitive
    diagnostic = getattr(rj, "diagnostic", None)
    source = getattr(rj, "result_source", None)
    if source == REJECT_SOURCE_SERVICE_USER and diagnostic == REJECT_DIAG_CALLED_AE_NOT_RECOGNISED:
        reason = "called AE not recognised"
    elif source == REJECT_SOURCE_SERVICE_USER and diagnostic == REJECT_DIAG_CALLING_AE_NOT_RECOGNISED:
        reason = "calling AE not recognised"
    elif source == REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION and diagnostic == REJECT_DIAG_LOCAL_LIMIT_EXCEEDED:
        reason = "maximum number of associations reached"
    else:
        reason = f"result source {source}, diagnostic {diagnostic}"
    _record_association_refusal(refusals, getattr(rq, "calling_ae_title", "?"), _peer(assoc), reason)
    LOGGER.warning(
        "rejected association from %s:%s (calling AE %s, called AE %s): %s",
        _peer(assoc),
        assoc.requestor.port,
        getattr(rq, "calling_ae_title", "?"),
        getattr(rq, "called_ae_title", "?"),
        reason,
    )
    if observer is not None:
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        _notify(observer.association_refused, _peer(assoc), calling, reason)
        if reason == "calling AE not recognised":
            _notify(observer.security_alert, _peer(assoc), f"calling AE {calling} not in allowed_calling_aets")


def handle_accepted(event: Event, association_log: AssociationLog) -> None:
    """Association accepted: start its counts."""
    association_log.opened(event.assoc)


def handle_conn_close(event: Event, association_log: AssociationLog) -> None:
    """Connection closed: write the association's one log line."""
    association_log.closed(event.assoc)
