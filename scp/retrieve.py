"""Retrieve SCU: fetch one series of a prior study from a PACS (C-MOVE or C-GET).

Implements the SCU side of the Query/Retrieve Service Class (PS3.4 Annex C) with the
Study Root information model (PS3.4 C.6.2) at SERIES level:
:func:`retrieve_series` sends a C-MOVE (PS3.4 C.4.2) to the node's own AE title, so the
instances arrive through the running ingress SCP and are stored there; or a C-GET
(PS3.4 C.4.3), where the instances arrive as C-STORE sub-operations on the same
association and are handed to a ``store`` callable (see :mod:`scp.instance_sink`).

Network and DIMSE failures never raise out of :func:`retrieve_series`: they come back
as a :class:`RetrieveResult` with ``ok=False`` and an error naming the PACS. Invalid
arguments raise :class:`~scp.errors.QueryArgumentError` /
:class:`~scp.errors.InvalidUIDError`. Each call builds its own AE and association
(:mod:`scp.association`); nothing is shared between calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp.ae import CT_STUDY_SOP_CLASSES, TRANSFER_SYNTAXES
from scp.association import create_ae
from scp.errors import QueryArgumentError
from scp.instance_sink import InstanceSink, handle_get_store, propose_storage_as_scp
from scp.pacs import QuerySource, associate, error_comment, read_multi, release
from scp.status import (
    STATUS_CANCEL,
    STATUS_MOVE_DESTINATION_UNKNOWN,
    STATUS_PENDING,
    STATUS_SUBOPERATIONS_WARNING,
    STATUS_SUCCESS,
    describe_retrieve_status,
)
from scp.validate import validate_uid

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

LOGGER = logging.getLogger(__name__)

_MAX_FAILED_UIDS_IN_ERROR = 3

#: (completed, failed, warning) sub-operations (PS3.4 C.4.2.1.5, C.4.3.1.4).
Counts = tuple[int, int, int]


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


@dataclass(frozen=True)
class _Responses:
    """What the responses to a C-MOVE / C-GET came to: the final status (``None`` when
    none came), its status dataset and identifier, and the last sub-operation counts."""

    final: int | None
    status_ds: Dataset
    identifier: Dataset | None
    counts: Counts


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
    :func:`scp.instance_sink.store_into`).

    Never raises for network or DIMSE failures: they come back with ``ok=False`` and an
    ``error`` naming the PACS. Raises :class:`~scp.errors.InvalidUIDError` for an
    invalid UID and :class:`~scp.errors.QueryArgumentError` when ``store`` is missing for C-GET.
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
        ext_neg = propose_storage_as_scp(ae, CT_STUDY_SOP_CLASSES, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, handle_get_store, [store, received, lock, source.label])]

    started = time.monotonic()
    LOGGER.info("%s of series %s (study %s) from %s started", operation, series_uid, study_uid, source.label)
    assoc, reason = associate(source, ae, ext_neg=ext_neg, evt_handlers=handlers)
    if assoc is None:
        result = _failed(f"{operation} not sent: {reason}")
    else:
        try:
            result = _collect(source, assoc, operation, query_model, identifier, received, lock)
        finally:
            release(assoc)
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


def retrieve_study(
    source: QuerySource, study_uid: str, series_uids: tuple[str, ...], *, store: InstanceSink | None = None
) -> str:
    """Retrieve each of ``series_uids`` of study ``study_uid`` (:func:`retrieve_series`); '' when all
    succeeded, else the failures' reasons joined by "; " (every series is tried)."""
    errors = []
    for uid in series_uids:
        result = retrieve_series(source, study_uid, uid, store=store)
        if not result.ok:
            errors.append(result.error or f"status {result.status}")
    return "; ".join(errors)


def _failed(error: str, *, counts: Counts = (0, 0, 0)) -> RetrieveResult:
    return RetrieveResult(
        ok=False,
        completed=counts[0],
        failed=counts[1],
        warning=counts[2],
        status=None,
        error=error,
        received_sop_uids=(),
    )


def _counts(status_ds: Dataset, previous: Counts) -> Counts:
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
    return read_multi(ident, "FailedSOPInstanceUIDList")


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
    outcome = _read_responses(source, operation, responses)
    if isinstance(outcome, RetrieveResult):
        return outcome
    with lock:
        stored = tuple(received)
    counts = outcome.counts
    if operation == "C-GET" and "NumberOfCompletedSuboperations" not in outcome.status_ds:
        counts = (max(counts[0], len(stored)), counts[1], counts[2])
    ok, error = _judge(source, operation, outcome, counts)
    completed, failed, warning = counts
    return RetrieveResult(ok, completed, failed, warning, outcome.final, error, stored)


def _read_responses(
    source: QuerySource, operation: str, responses: Iterator[tuple[Dataset, Dataset | None]]
) -> _Responses | RetrieveResult:
    """Read every response; a failed result (with the counts so far) when reading them fails."""
    counts: Counts = (0, 0, 0)
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
    return _Responses(final, final_ds, final_ident, counts)


def _judge(source: QuerySource, operation: str, outcome: _Responses, counts: Counts) -> tuple[bool, str]:
    """``(ok, error)`` for the final response: the error names the PACS, the status and the counts."""
    completed, failed, warning = counts
    final = outcome.final
    if final is None:
        return False, (
            f"{operation} from {source.label} got no final response (timed out after {source.timeout_s:g} s, "
            f"aborted, or an invalid response) after {completed} completed, {failed} failed"
        )
    described = f"{describe_retrieve_status(final)}{error_comment(outcome.status_ds)}"
    if final == STATUS_MOVE_DESTINATION_UNKNOWN:
        return False, (
            f"{source.label} refused {operation}: {described} - "
            f"add {source.move_destination_ae} (this node's ingress AE title, host and port) to its modalities"
        )
    counts_text = f"{completed} completed, {failed} failed, {warning} warning"
    failed_note = _failed_note(_failed_uids(outcome.identifier))
    if final not in (STATUS_SUCCESS, STATUS_SUBOPERATIONS_WARNING):
        verb = "cancelled" if final == STATUS_CANCEL else "refused"
        hint = ""
        if operation == "C-MOVE" and final != STATUS_CANCEL and completed + failed + warning == 0:
            # Some PACS (Orthanc 1.10) answer an unknown Move Destination with a bare 0xC000.
            hint = (
                f"; if it does not know the move destination {source.move_destination_ae}, add it "
                "(this node's ingress AE title, host and port) to its modalities"
            )
        return False, f"{source.label} {verb} {operation}: {described} ({counts_text}){failed_note}{hint}"
    if failed:
        return False, (
            f"{operation} from {source.label} partly failed: {describe_retrieve_status(final)} "
            f"({counts_text}){failed_note}"
        )
    if completed + warning == 0:
        return False, (
            f"{operation} from {source.label} matched no instance of the series "
            f"(status {describe_retrieve_status(final)})"
        )
    return True, ""


def _failed_note(failed_uids: tuple[str, ...]) -> str:
    if not failed_uids:
        return ""
    shown = ", ".join(failed_uids[:_MAX_FAILED_UIDS_IN_ERROR])
    more = len(failed_uids) - _MAX_FAILED_UIDS_IN_ERROR
    return f"; failed SOP Instances: {shown}{f' and {more} more' if more > 0 else ''}"
