"""Query/Retrieve SCU: find a patient's prior CT study on a PACS and retrieve a series.

Implements the SCU side of the Query/Retrieve Service Class (PS3.4 Annex C) with the
Study Root information model (PS3.4 C.6.2):

* :func:`find_studies` - C-FIND at STUDY level (PS3.4 C.4.1, keys C.6.2.1.2): the
  patient's studies strictly before a date, containing a modality, newest first.
* :func:`find_series` - C-FIND at SERIES level (PS3.4 C.4.1, keys C.6.2.1.3).
* :func:`retrieve_series` - C-MOVE (PS3.4 C.4.2) to the node's own AE title, so the
  instances arrive through the running ingress SCP and are stored there; or C-GET
  (PS3.4 C.4.3), where the instances arrive as C-STORE sub-operations on the same
  association and are handed to a ``store`` callable; :func:`store_into` builds one
  that writes them exactly like the ingress does (spool + index, durable, duplicates
  ignored).

Network and DIMSE failures never raise out of :func:`retrieve_series`: they come back
as a :class:`RetrieveResult` with ``ok=False`` and an error naming the PACS. A C-FIND
that fails raises :class:`QueryFailedError` (also naming the PACS), because an empty
list would read as "this patient has no prior study". Invalid arguments raise
:class:`QueryArgumentError` / :class:`QuerySourceError` /
:class:`~scp.errors.InvalidUIDError`.

Logs carry identifiers only (UIDs, counts, the PACS name and address), never a
PatientID or a name. pynetdicom itself logs request identifiers at INFO; the CLI keeps
its logger at WARNING.

Each call builds its own AE and association (:mod:`scp.association`); nothing is shared
between calls, so the functions may run on several threads at once.
"""

from __future__ import annotations

import datetime
import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp.ae import CT_STUDY_SOP_CLASSES, TRANSFER_SYNTAXES
from scp.association import AssociationSettings, RemoteAE, create_ae, request_association
from scp.errors import IngressError, InvalidUIDError
from scp.spool import write_instance
from scp.status import (
    PENDING_STATUSES,
    STATUS_CANCEL,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MOVE_DESTINATION_UNKNOWN,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PENDING,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUBOPERATIONS_WARNING,
    STATUS_SUCCESS,
    describe_retrieve_status,
)
from scp.types import ReceivedInstance
from scp.validate import validate_ae_title, validate_uid

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    from scp.index import InstanceIndex

LOGGER = logging.getLogger(__name__)

RetrieveMethod = Literal["move", "get"]
RETRIEVE_METHODS: tuple[str, ...] = ("move", "get")

#: Receives each instance of a C-GET: a complete DICOM Part 10 file (PS3.10 7.1) whose
#: dataset is byte for byte what the PACS sent. Raising refuses that instance (its
#: C-STORE sub-operation is answered with a failure and counted as failed).
InstanceSink = Callable[[bytes], None]

#: Longest LO value (PS3.5 Table 6.2-1): PatientID, IssuerOfPatientID.
_LO_MAX_CHARS = 64
#: Longest CS value (PS3.5 Table 6.2-1): Modality.
_CS_MAX_CHARS = 16
#: Characters with a matching meaning in C-FIND keys (PS3.4 C.2.2.2.4, C.2.2.2.2).
_WILDCARDS = ("*", "?", "\\")
_PREAMBLE_AND_PREFIX = b"\x00" * 128 + b"DICM"
_MAX_FAILED_UIDS_IN_ERROR = 3


# --- errors ---------------------------------------------------------------------------
class RetrieveError(IngressError):
    """Base of the Query/Retrieve SCU errors."""


class QuerySourceError(RetrieveError):
    """A :class:`QuerySource` field has a value that is not allowed."""


class QueryArgumentError(RetrieveError):
    """An argument of :func:`find_studies` / :func:`find_series` / :func:`retrieve_series`
    is not allowed."""


class QueryFailedError(RetrieveError):
    """A C-FIND could not be completed (no association, refused, failure status, no answer)."""


# --- hand-off types ---------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySource:
    """A PACS to query and retrieve from, validated when created.

    ``calling_ae_title`` is the AE title we call with. ``method`` is ``"move"``
    (C-MOVE, PS3.4 C.4.2: the PACS opens an association to ``move_destination_ae``,
    which it must know by host and port - our ingress SCP) or ``"get"`` (C-GET,
    PS3.4 C.4.3: the instances come back on our own association). ``timeout_s``
    bounds connecting, each association step and the wait for each DIMSE message.
    """

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    method: RetrieveMethod = "move"
    move_destination_ae: str = ""
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name.strip():
            raise QuerySourceError(f"name must be a non-empty string (used in messages); got {self.name!r}")
        set_(self, "ae_title", validate_ae_title(self.ae_title, "ae_title", QuerySourceError))
        calling = validate_ae_title(self.calling_ae_title, "calling_ae_title", QuerySourceError)
        set_(self, "calling_ae_title", calling)
        if not isinstance(self.host, str) or not self.host.strip() or any(c.isspace() for c in self.host.strip()):
            raise QuerySourceError(f"host must be a host name or IP address without spaces; got {self.host!r}")
        set_(self, "host", self.host.strip())
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise QuerySourceError(f"port is {self.port!r}; allowed: an integer 1..65535")
        if self.method not in RETRIEVE_METHODS:
            raise QuerySourceError(f"method is {self.method!r}; allowed: {', '.join(map(repr, RETRIEVE_METHODS))}")
        if self.method == "move" and self.move_destination_ae == "":
            raise QuerySourceError(
                "move_destination_ae is empty; method 'move' needs it: the AE title of this node's "
                "ingress SCP, known to the PACS (1 to 16 printable ASCII characters)"
            )
        if self.move_destination_ae != "":
            destination = validate_ae_title(self.move_destination_ae, "move_destination_ae", QuerySourceError)
            set_(self, "move_destination_ae", destination)
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise QuerySourceError(f"timeout_s must be a finite number of seconds > 0; got {timeout!r}")
        if timeout <= 0:
            raise QuerySourceError(f"timeout_s is {timeout!r}; allowed: a finite number of seconds > 0")
        set_(self, "timeout_s", float(timeout))

    @property
    def label(self) -> str:
        """``name (AE@host:port)``, how messages and logs name the PACS."""
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    @property
    def association(self) -> AssociationSettings:
        """Our side of an association with this PACS: ``timeout_s`` bounds every wait."""
        return AssociationSettings.with_timeout(self.calling_ae_title, self.timeout_s)

    @property
    def peer(self) -> RemoteAE:
        return RemoteAE(self.ae_title, self.host, self.port)


@dataclass(frozen=True)
class StudyMatch:
    """One STUDY-level C-FIND match (PS3.4 C.6.2.1.2); empty strings when not returned.

    ``study_date`` is DA (YYYYMMDD), ``study_time`` TM as returned.
    """

    study_instance_uid: str
    study_date: str
    study_time: str
    study_description: str
    modalities_in_study: tuple[str, ...]
    accession_number: str
    number_of_series: int | None


@dataclass(frozen=True)
class SeriesMatch:
    """One SERIES-level C-FIND match (PS3.4 C.6.2.1.3); empty strings when not returned."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    number_of_instances: int | None
    body_part_examined: str


@dataclass(frozen=True)
class RetrieveResult:
    """Outcome of :func:`retrieve_series`.

    ``ok`` is True when the PACS reported completion with no failed sub-operation and
    at least one instance was sent. ``completed`` / ``failed`` / ``warning`` are the
    sub-operation counts (PS3.4 C.4.2.1.5 / C.4.3.1.4) from the final response (or
    the last one received). ``status`` is the final DIMSE status, ``None`` when none
    came (no association, timeout, abort). ``error`` is ``""`` when ``ok``, else says
    what went wrong and names the PACS. ``received_sop_uids`` lists the instances
    stored on this association (C-GET); it is empty for C-MOVE, whose instances
    arrive on the ingress SCP and are recorded in its index.
    """

    ok: bool
    completed: int
    failed: int
    warning: int
    status: int | None
    error: str
    received_sop_uids: tuple[str, ...]


# --- validation -------------------------------------------------------------------------
def _check_key_text(value: object, keyword: str, max_chars: int, *, allow_empty: bool) -> str:
    """A single-valued matching key without wildcards (single value matching, PS3.4 C.2.2.2.1)."""
    allowed = (
        f"{'0' if allow_empty else '1'} to {max_chars} characters, no control characters, "
        f"no wildcard or backslash ({' '.join(_WILDCARDS)})"
    )
    if not isinstance(value, str):
        raise QueryArgumentError(f"{keyword} must be a string ({allowed}); got {type(value).__name__}")
    text = value.strip(" ")
    if not text and not allow_empty:
        raise QueryArgumentError(f"{keyword} is empty; allowed: {allowed}")
    if len(text) > max_chars:
        raise QueryArgumentError(f"{keyword} is {len(text)} characters long; allowed: {allowed}")
    # The value itself is not echoed: PatientID must not reach logs or job records.
    bad = [c for c in text if c in _WILDCARDS or ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        raise QueryArgumentError(f"{keyword} contains {bad[0]!r}; allowed: {allowed}")
    return text


def _check_date(value: object, keyword: str) -> str:
    allowed = "a date YYYYMMDD (DA, PS3.5 Table 6.2-1)"
    if not isinstance(value, str) or len(value) != 8 or not value.isdigit():
        raise QueryArgumentError(f"{keyword} is {value!r}; allowed: {allowed}")
    try:
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryArgumentError(f"{keyword} is {value!r}, not a calendar date; allowed: {allowed}") from None
    return value


def _check_modality(value: object) -> str:
    allowed = "'' (any) or a Modality code of up to 16 upper-case letters, digits or '_' (CS)"
    if not isinstance(value, str):
        raise QueryArgumentError(f"modality is {value!r}; allowed: {allowed}")
    text = value.strip(" ")
    if len(text) > _CS_MAX_CHARS or any(not (c.isascii() and (c.isupper() or c.isdigit() or c == "_")) for c in text):
        raise QueryArgumentError(f"modality is {value!r}; allowed: {allowed}")
    return text


# --- association ------------------------------------------------------------------------
def _associate(
    source: QuerySource,
    ae: AE,
    *,
    ext_neg: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
    evt_handlers: list[EventHandlerType] | None = None,
) -> tuple[Association | None, str]:
    """Open an association to ``source``; returns ``(assoc, "")`` or ``(None, reason)``.

    pynetdicom reports a refused TCP connection as an aborted association; an
    EVT_CONN_OPEN handler tells the two apart.
    """
    connected = threading.Event()
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, handle_conn_open, [connected]), *(evt_handlers or [])]
    try:
        assoc = request_association(ae, source.peer, ext_neg=ext_neg, evt_handlers=handlers)
    except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable host name
        return None, f"{source.label}: could not connect ({type(exc).__name__}: {exc})"
    if assoc.is_established:
        return assoc, ""
    if not connected.is_set():
        return None, (
            f"{source.label}: could not connect (connection refused, host unreachable, "
            f"or no TCP connection within {source.timeout_s:g} s)"
        )
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        detail = ""
        if rj is not None:
            detail = (
                f" ({_safe(lambda: rj.result_str)}, {_safe(lambda: rj.source_str)}: {_safe(lambda: rj.reason_str)})"
            )
        return None, (
            f"{source.label} rejected the association from {source.calling_ae_title}{detail}; "
            f"check that it knows the calling AE title {source.calling_ae_title} and is called {source.ae_title}"
        )
    if assoc.is_aborted:
        return None, (
            f"{source.label} aborted the association request or closed the connection "
            f"(or sent no answer within {source.timeout_s:g} s)"
        )
    return None, f"{source.label}: no association (no answer within {source.timeout_s:g} s)"


def handle_conn_open(event: Event, connected: threading.Event) -> None:
    """EVT_CONN_OPEN on our requesting association: the TCP connection is up."""
    connected.set()


def _safe(get: Callable[[], object]) -> str:
    try:
        return str(get())
    except Exception:  # noqa: BLE001 - only used to describe a rejection
        return "?"


def _release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001 - the peer may already be gone
        assoc.abort()


def _error_comment(status_ds: Dataset) -> str:
    comment = status_ds.get("ErrorComment")
    return f" ({str(comment).strip()})" if comment else ""


# --- C-FIND -----------------------------------------------------------------------------
def _run_find(source: QuerySource, identifier: Dataset, level: str) -> list[Dataset]:
    """Send one Study Root C-FIND (PS3.4 C.4.1) and collect the pending identifiers.

    Raises :class:`QueryFailedError` naming the PACS when the association fails, the
    final status is not Success, or no final response arrives.
    """
    ae = create_ae(source.association)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc, reason = _associate(source, ae)
    if assoc is None:
        raise QueryFailedError(f"C-FIND {level} failed: {reason}")
    matches: list[Dataset] = []
    try:
        try:
            responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        except ValueError as exc:
            raise QueryFailedError(f"{source.label} did not accept Study Root Query/Retrieve - FIND ({exc})") from None
        final: int | None = None
        for status_ds, ident in responses:
            if "Status" not in status_ds:
                raise QueryFailedError(
                    f"C-FIND {level} on {source.label} got no final response "
                    f"(timed out after {source.timeout_s:g} s, aborted, or an invalid response); "
                    f"{len(matches)} matches so far"
                )
            status = int(status_ds.Status)
            if status in PENDING_STATUSES:
                if ident is not None:
                    matches.append(ident)
                continue
            final = status
            if status != STATUS_SUCCESS:
                raise QueryFailedError(
                    f"{source.label} refused C-FIND {level}: {describe_retrieve_status(status)}{_error_comment(status_ds)}"
                )
        if final is None:
            raise QueryFailedError(f"C-FIND {level} on {source.label} ended without a final status")
    finally:
        _release(assoc)
    return matches


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip(" \x00")


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return tuple(v for v in (str(x).strip(" \x00") for x in values) if v)


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    text = _text(ds, keyword)
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _time_key(study_time: str) -> str:
    """TM as a sortable HHMMSS.ffffff (PS3.5 Table 6.2-1: components may be omitted)."""
    whole, _, fraction = study_time.replace(":", "").partition(".")
    return f"{whole.ljust(6, '0')}.{fraction.ljust(6, '0')}"


def find_studies(
    source: QuerySource,
    *,
    patient_id: str,
    issuer_of_patient_id: str = "",
    before_date: str | None = None,
    modality: str = "CT",
) -> list[StudyMatch]:
    """The patient's studies on ``source``, newest first (Study Root C-FIND at STUDY level).

    PS3.4 C.4.1 / C.6.2.1.2. Keys: PatientID (single value matching; wildcards are
    refused so that no other patient can match), IssuerOfPatientID when given,
    StudyDate ``-YYYYMMDD`` (range matching, PS3.4 C.2.2.2.5) when ``before_date`` is
    given, ModalitiesInStudy when ``modality`` is not ``""``. The PACS's answer is
    checked again here, because not every PACS matches every key: a study is dropped
    when its returned PatientID or IssuerOfPatientID differs, when ``before_date`` is
    given and its StudyDate is missing or not strictly earlier, or when it returns
    ModalitiesInStudy without ``modality``. A study whose ModalitiesInStudy comes back
    empty is kept (the series selection checks the modality anyway).

    Raises :class:`QueryArgumentError` for invalid arguments and
    :class:`QueryFailedError` when the C-FIND fails (the message names the PACS).
    """
    patient_id = _check_key_text(patient_id, "patient_id", _LO_MAX_CHARS, allow_empty=False)
    issuer = _check_key_text(issuer_of_patient_id, "issuer_of_patient_id", _LO_MAX_CHARS, allow_empty=True)
    if before_date is not None:
        before_date = _check_date(before_date, "before_date")
    modality = _check_modality(modality)

    query = Dataset()
    if not (patient_id + issuer).isascii():
        query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer:
        query.IssuerOfPatientID = issuer
    query.StudyInstanceUID = ""
    query.StudyDate = f"-{before_date}" if before_date else ""
    query.StudyTime = ""
    query.StudyDescription = ""
    query.AccessionNumber = ""
    query.ModalitiesInStudy = modality
    query.NumberOfStudyRelatedSeries = None

    started = time.monotonic()
    LOGGER.info(
        "C-FIND STUDY on %s: before %s, modality %s",
        source.label,
        before_date or "any date",
        modality or "any",
    )
    identifiers = _run_find(source, query, "STUDY")

    kept: dict[str, StudyMatch] = {}
    dropped = 0
    for ident in identifiers:
        study_uid = _text(ident, "StudyInstanceUID")
        try:
            validate_uid(study_uid, "StudyInstanceUID")
        except InvalidUIDError:
            dropped += 1
            continue
        returned_id = _text(ident, "PatientID")
        returned_issuer = _text(ident, "IssuerOfPatientID")
        study_date = _text(ident, "StudyDate")
        modalities = _multi(ident, "ModalitiesInStudy")
        if (
            (returned_id and returned_id != patient_id)
            or (issuer and returned_issuer and returned_issuer != issuer)
            or (before_date and not (len(study_date) == 8 and study_date.isdigit() and study_date < before_date))
            or (modality and modalities and modality not in modalities)
        ):
            dropped += 1
            continue
        kept[study_uid] = StudyMatch(
            study_instance_uid=study_uid,
            study_date=study_date,
            study_time=_text(ident, "StudyTime"),
            study_description=_text(ident, "StudyDescription"),
            modalities_in_study=modalities,
            accession_number=_text(ident, "AccessionNumber"),
            number_of_series=_int_or_none(ident, "NumberOfStudyRelatedSeries"),
        )
    studies = sorted(
        kept.values(),
        key=lambda m: (m.study_date, _time_key(m.study_time), m.study_instance_uid),
        reverse=True,
    )
    LOGGER.info(
        "C-FIND STUDY on %s: %d matches, %d kept (%s), %d dropped by the client-side check, %.2f s",
        source.label,
        len(identifiers),
        len(studies),
        ", ".join(m.study_instance_uid for m in studies) or "none",
        dropped,
        time.monotonic() - started,
    )
    return studies


def find_series(source: QuerySource, study_uid: str) -> list[SeriesMatch]:
    """The series of one study on ``source``, by SeriesNumber (C-FIND at SERIES level).

    PS3.4 C.4.1 / C.6.2.1.3 (Study Root: StudyInstanceUID is the unique key of the
    level above). Raises :class:`~scp.errors.InvalidUIDError` for an invalid
    ``study_uid`` and :class:`QueryFailedError` when the C-FIND fails.
    """
    validate_uid(study_uid, "StudyInstanceUID")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesNumber = None
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = None
    query.BodyPartExamined = ""

    started = time.monotonic()
    identifiers = _run_find(source, query, "SERIES")
    series: dict[str, SeriesMatch] = {}
    for ident in identifiers:
        returned_study = _text(ident, "StudyInstanceUID")
        series_uid = _text(ident, "SeriesInstanceUID")
        if returned_study and returned_study != study_uid:
            continue
        try:
            validate_uid(series_uid, "SeriesInstanceUID")
        except InvalidUIDError:
            continue
        series[series_uid] = SeriesMatch(
            series_instance_uid=series_uid,
            modality=_text(ident, "Modality"),
            series_number=_int_or_none(ident, "SeriesNumber"),
            series_description=_text(ident, "SeriesDescription"),
            number_of_instances=_int_or_none(ident, "NumberOfSeriesRelatedInstances"),
            body_part_examined=_text(ident, "BodyPartExamined"),
        )
    ordered = sorted(
        series.values(),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid),
    )
    LOGGER.info(
        "C-FIND SERIES on %s for study %s: %d series, %.2f s",
        source.label,
        study_uid,
        len(ordered),
        time.monotonic() - started,
    )
    return ordered


# --- C-MOVE / C-GET ---------------------------------------------------------------------
def handle_get_store(
    event: Event,
    store: InstanceSink,
    received: list[str],
    lock: threading.Lock,
    source_label: str,
) -> int:
    """C-STORE sub-operation of our C-GET (PS3.4 C.4.3.3, B.2.3): hand the instance to ``store``.

    The instance is passed on as a Part 10 file whose dataset is what the PACS sent
    (its transfer syntax, never decoded), with SourceApplicationEntityTitle set to the
    PACS's AE title. Answers Success once ``store`` returned, else a failure status
    (Out of Resources when the disk is full). Never raises.
    """
    sop_uid = "<unknown>"
    try:
        request = cast("C_STORE", event.request)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        stream = request.DataSet
        if stream is None:
            LOGGER.warning("C-GET from %s: SOP Instance %s came without a dataset", source_label, sop_uid)
            return STATUS_CANNOT_UNDERSTAND
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = event.assoc.acceptor.ae_title
        data = _PREAMBLE_AND_PREFIX + encode_file_meta(file_meta) + stream.getvalue()
        store(data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            LOGGER.error("C-GET from %s: could not store SOP Instance %s: disk full", source_label, sop_uid)
            return STATUS_OUT_OF_RESOURCES
        LOGGER.exception("C-GET from %s: could not store SOP Instance %s", source_label, sop_uid)
        return STATUS_PROCESSING_FAILURE
    except Exception:
        LOGGER.exception("C-GET from %s: could not store SOP Instance %s", source_label, sop_uid)
        return STATUS_PROCESSING_FAILURE
    with lock:
        received.append(sop_uid)
    return STATUS_SUCCESS


def store_into(
    index: InstanceIndex,
    spool_dir: Path,
    calling_ae: str,
    peer_address: str = "",
) -> InstanceSink:
    """An :data:`InstanceSink` that stores each instance exactly like the ingress SCP does.

    The file is written durably with :func:`scp.spool.write_instance` to
    ``<spool_dir>/<study>/<series>/<sop>.dcm`` and recorded with
    :meth:`InstanceIndex.record` (``calling_ae`` is recorded as the sender: the PACS's
    AE title; ``peer_address`` its address). An instance whose SOP Instance UID is
    already in the index is ignored (not written again). Raises (so the sub-operation
    is answered with a failure) when the header cannot be read, a UID is invalid or
    the write fails.
    """
    calling_ae = validate_ae_title(calling_ae, "calling_ae", QuerySourceError)
    spool = Path(spool_dir)

    def store(data: bytes) -> None:
        received_at = time.time()
        ds = dcmread(
            BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["SOPInstanceUID", "SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID"],
        )
        meta = ds.file_meta
        sop_uid = validate_uid(str(meta.get("MediaStorageSOPInstanceUID", "")).strip(" \x00"), "SOPInstanceUID")
        if index.has(sop_uid):
            LOGGER.info("SOP Instance %s already received: not written again", sop_uid)
            return
        study_uid = validate_uid(_text(ds, "StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
        path = write_instance(spool, study_uid, series_uid, sop_uid, data)
        index.record(
            ReceivedInstance(
                sop_instance_uid=sop_uid,
                sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")).strip(" \x00"),
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                modality=_text(ds, "Modality"),
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                path=path,
                size_bytes=len(data),
                calling_ae=calling_ae,
                peer_address=peer_address,
                received_at=received_at,
            )
        )

    return store


def _propose_storage_as_scp(
    ae: AE, sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]
) -> list[SCP_SCU_RoleSelectionNegotiation]:
    """Propose each storage SOP class on ``ae`` and return the SCP/SCU Role Selection items
    that let the PACS send C-STORE sub-operations of a C-GET to us (PS3.4 C.4.3, PS3.7 D.3.3.4)."""
    for uid in sop_classes:
        ae.add_requested_context(uid, list(transfer_syntaxes))
    return [build_role(uid, scp_role=True) for uid in sop_classes]


def retrieve_series(
    source: QuerySource,
    study_uid: str,
    series_uid: str,
    *,
    store: InstanceSink | None = None,
) -> RetrieveResult:
    """Retrieve one series from ``source`` with the Study Root model at SERIES level.

    ``source.method == "move"``: C-MOVE (PS3.4 C.4.2) with Move Destination
    ``source.move_destination_ae``; the PACS sends the instances to the node's running
    ingress SCP, which stores and indexes them. ``"get"``: C-GET (PS3.4 C.4.3); the
    instances arrive on this association (the CT study's storage SOP classes are
    proposed with the SCP role) and each is passed to ``store`` (required; see
    :func:`store_into`).

    Never raises for network or DIMSE failures: they come back with ``ok=False`` and an
    ``error`` naming the PACS. Raises :class:`~scp.errors.InvalidUIDError` for an
    invalid UID and :class:`QueryArgumentError` when ``store`` is missing for C-GET.
    """
    validate_uid(study_uid, "StudyInstanceUID")
    validate_uid(series_uid, "SeriesInstanceUID")
    if source.method == "get" and store is None:
        raise QueryArgumentError("store is None; method 'get' needs a store callable (see store_into)")
    if store is not None and not callable(store):
        raise QueryArgumentError(f"store must be callable or None; got {type(store).__name__}")

    operation = "C-MOVE" if source.method == "move" else "C-GET"
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid

    received: list[str] = []
    lock = threading.Lock()
    ae = create_ae(source.association)
    ext_neg: list[SCP_SCU_RoleSelectionNegotiation] | None = None
    handlers: list[EventHandlerType] | None = None
    if source.method == "move":
        query_model = StudyRootQueryRetrieveInformationModelMove
        ae.add_requested_context(query_model)
    else:
        query_model = StudyRootQueryRetrieveInformationModelGet
        ae.add_requested_context(query_model)
        ext_neg = _propose_storage_as_scp(ae, CT_STUDY_SOP_CLASSES, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, handle_get_store, [store, received, lock, source.label])]

    started = time.monotonic()
    LOGGER.info("%s of series %s (study %s) from %s started", operation, series_uid, study_uid, source.label)
    assoc, reason = _associate(source, ae, ext_neg=ext_neg, evt_handlers=handlers)
    if assoc is None:
        result = _failed(f"{operation} not sent: {reason}")
    else:
        try:
            result = _collect(source, assoc, operation, query_model, identifier, received, lock)
        finally:
            _release(assoc)
    LOGGER.log(
        logging.INFO if result.ok else logging.WARNING,
        "%s of series %s (study %s) from %s %s: status %s, %d completed, %d failed, %d warning, "
        "%d stored here, %.2f s%s",
        operation,
        series_uid,
        study_uid,
        source.label,
        "succeeded" if result.ok else "FAILED",
        "none" if result.status is None else f"0x{result.status:04X}",
        result.completed,
        result.failed,
        result.warning,
        len(result.received_sop_uids),
        time.monotonic() - started,
        "" if result.ok else f": {result.error}",
    )
    return result


def _failed(error: str, *, counts: tuple[int, int, int] = (0, 0, 0)) -> RetrieveResult:
    return RetrieveResult(
        ok=False,
        completed=counts[0],
        failed=counts[1],
        warning=counts[2],
        status=None,
        error=error,
        received_sop_uids=(),
    )


def _counts(status_ds: Dataset, previous: tuple[int, int, int]) -> tuple[int, int, int]:
    """(completed, failed, warning) from a response, keeping ``previous`` for those it lacks."""
    values = []
    for keyword, before in zip(
        (
            "NumberOfCompletedSuboperations",
            "NumberOfFailedSuboperations",
            "NumberOfWarningSuboperations",
        ),
        previous,
    ):
        value = status_ds.get(keyword)
        values.append(int(value) if isinstance(value, int) else before)
    return values[0], values[1], values[2]


def _failed_uids(ident: Dataset | None) -> tuple[str, ...]:
    if ident is None:
        return ()
    return _multi(ident, "FailedSOPInstanceUIDList")


def _collect(
    source: QuerySource,
    assoc: Association,
    operation: str,
    query_model: UID,
    identifier: Dataset,
    received: list[str],
    lock: threading.Lock,
) -> RetrieveResult:
    """Send the C-MOVE / C-GET and turn its responses into a :class:`RetrieveResult`."""
    try:
        if operation == "C-MOVE":
            responses: Iterator[tuple[Dataset, Dataset | None]] = assoc.send_c_move(
                identifier, source.move_destination_ae, query_model
            )
        else:
            responses = assoc.send_c_get(identifier, query_model)
    except ValueError as exc:
        return _failed(f"{source.label} did not accept {UID(query_model).name} ({exc})")

    counts = (0, 0, 0)
    final: int | None = None
    final_ds = Dataset()
    final_ident: Dataset | None = None
    try:
        for status_ds, ident in responses:
            if "Status" not in status_ds:
                break  # timeout, abort or invalid response: pynetdicom yields an empty status
            status = int(status_ds.Status)
            counts = _counts(status_ds, counts)
            if status == STATUS_PENDING:
                continue
            final, final_ds, final_ident = status, status_ds, ident
    except Exception as exc:
        LOGGER.exception("%s from %s failed", operation, source.label)
        return _failed(f"{operation} from {source.label} failed: {type(exc).__name__}: {exc}", counts=counts)

    with lock:
        stored = tuple(received)
    if operation == "C-GET" and "NumberOfCompletedSuboperations" not in final_ds:
        counts = (max(counts[0], len(stored)), counts[1], counts[2])
    completed, failed, warning = counts

    def result(ok: bool, error: str) -> RetrieveResult:
        return RetrieveResult(
            ok=ok,
            completed=completed,
            failed=failed,
            warning=warning,
            status=final,
            error=error,
            received_sop_uids=stored,
        )

    if final is None:
        return result(
            False,
            f"{operation} from {source.label} got no final response (timed out after {source.timeout_s:g} s, "
            f"aborted, or an invalid response) after {completed} completed, {failed} failed",
        )
    failed_uids = _failed_uids(final_ident)
    failed_note = ""
    if failed_uids:
        shown = ", ".join(failed_uids[:_MAX_FAILED_UIDS_IN_ERROR])
        more = len(failed_uids) - _MAX_FAILED_UIDS_IN_ERROR
        failed_note = f"; failed SOP Instances: {shown}{f' and {more} more' if more > 0 else ''}"
    counts_text = f"{completed} completed, {failed} failed, {warning} warning"
    if final == STATUS_MOVE_DESTINATION_UNKNOWN:
        return result(
            False,
            f"{source.label} refused {operation}: {describe_retrieve_status(final)}{_error_comment(final_ds)} - "
            f"add {source.move_destination_ae} (this node's ingress AE title, host and port) to its modalities",
        )
    if final not in (STATUS_SUCCESS, STATUS_SUBOPERATIONS_WARNING):
        verb = "cancelled" if final == STATUS_CANCEL else "refused"
        hint = ""
        if operation == "C-MOVE" and final != STATUS_CANCEL and completed + failed + warning == 0:
            # Some PACS (Orthanc 1.10) answer an unknown Move Destination with a bare 0xC000.
            hint = (
                f"; if it does not know the move destination {source.move_destination_ae}, add it "
                "(this node's ingress AE title, host and port) to its modalities"
            )
        return result(
            False,
            f"{source.label} {verb} {operation}: {describe_retrieve_status(final)}{_error_comment(final_ds)} "
            f"({counts_text}){failed_note}{hint}",
        )
    if failed:
        return result(
            False,
            f"{operation} from {source.label} partly failed: {describe_retrieve_status(final)} ({counts_text}){failed_note}",
        )
    if completed + warning == 0:
        return result(
            False,
            f"{operation} from {source.label} matched no instance of the series (status {describe_retrieve_status(final)})",
        )
    return result(True, "")
