"""C-STORE SCU: send DICOM files to a configured destination (and C-ECHO it).

Implements the SCU side of the Storage Service Class (PS3.4 Annex B) and the
Verification Service Class (PS3.4 Annex A) over one association per batch
(PS3.8 7.1). Presentation contexts are negotiated as in PS3.8 9.3.2.2 / 7.1.1.13:
for each SOP Class in the batch we propose

* one context with the uncompressed syntaxes: the files' own native little-endian
  syntax(es) first, then Explicit VR Little Endian and Implicit VR Little Endian
  as fallbacks (pynetdicom re-encodes between them);
* one context per compressed, deflated (or big-endian) transfer syntax seen for that
  class, each on its own so that the peer's preference among several syntaxes of one
  context cannot turn it down silently: compressed objects travel as they are wherever
  the peer accepts their syntax.

If the peer accepts a SOP Class only uncompressed, a compressed object is
decompressed with pydicom (a deflated one is sent inflated) before it is sent (so the
uncompressed context is also proposed for classes whose files are all compressed).
An object whose own syntax the peer accepted is sent as stored: pynetdicom streams the file's
encoded dataset in PDU-sized chunks (``STORE_SEND_CHUNKED_DATASET``) without decoding it, so a
deflated BINARY SEG (1 MB on disk, 222 MB inflated for a 300-slice CT) costs neither the memory
nor the CPU of inflating and deflating it again.
:attr:`SendResult.transfer_syntax_uid` says which syntax was used. A class for which the peer
accepts no context at all is reported per object as *refused*, permanently;
nothing of it is sent and the rest of the batch goes on. At most 128 contexts are
proposed per association (PS3.8 9.3.2.2); larger plans are split over several
associations.

Per-object failures are returned as :class:`SendResult` with ``ok=False``, never
raised; so are association failures (every object of the batch then carries the
same transient error naming the destination).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicomout.errors import DestinationError, SendError
from dicomout.files import read_leading
from scp.association import (
    AssociationSettings,
    RemoteAE,
    create_ae,
    request_association,
)
from scp.status import STATUS_SUCCESS, describe_status, is_permanent_failure, is_stored
from scp.tls import TlsConfig, client_context
from scp.validate import is_valid_uid, validate_ae_title

LOGGER = logging.getLogger(__name__)

# send_c_store(path) streams the file's encoded dataset as it is (an exact context is then required,
# which _prepare_dataset ensures); send_c_store(dataset) is unaffected. This module is the only sender.
_config.STORE_SEND_CHUNKED_DATASET = True

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255, so 128 at most.
MAX_PRESENTATION_CONTEXTS = 128

_FALLBACK_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# --- destination ---------------------------------------------------------------------
@dataclass(frozen=True)
class Destination:
    """A remote DICOM AE that receives our objects (a PACS, a viewer, Orthanc).

    ``timeout_s`` bounds the TCP connect, the association negotiation (ACSE) and
    each DIMSE response. ``max_pdu`` is the maximum PDU length we are willing to
    receive (PS3.8 D.1.1); 0 means unlimited. With ``tls`` the association is DICOM TLS
    (PS3.15 Annex B): the destination's certificate must be issued by ``tls``'s trust
    store for ``host``, and the node presents its own certificate.
    """

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "THIGHNODE"
    timeout_s: float = 30.0
    max_pdu: int = 0
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise DestinationError(f"Destination.tls must be a TlsConfig or None; got {type(self.tls).__name__}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise DestinationError(f"Destination.name must be a non-empty string; got {self.name!r}")
        validate_ae_title(self.ae_title, "Destination.ae_title", DestinationError)
        validate_ae_title(self.calling_ae_title, "Destination.calling_ae_title", DestinationError)
        if not isinstance(self.host, str) or not self.host.strip() or any(c.isspace() for c in self.host):
            raise DestinationError(
                f"Destination.host of {self.name!r} is {self.host!r} (allowed: a host name or IP address)"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise DestinationError(
                f"Destination.port of {self.name!r} is {self.port!r} (allowed: an integer 1-65535)"
            )
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise DestinationError(
                f"Destination.timeout_s of {self.name!r} is {self.timeout_s!r} (allowed: a number > 0)"
            )
        if (
            isinstance(self.max_pdu, bool)
            or not isinstance(self.max_pdu, int)
            or not (self.max_pdu == 0 or 4096 <= self.max_pdu <= 0xFFFFFFFF)
        ):
            raise DestinationError(
                f"Destination.max_pdu of {self.name!r} is {self.max_pdu!r} "
                "(allowed: 0 for unlimited, or 4096-4294967295 bytes)"
            )

    @property
    def label(self) -> str:
        """``PACS (PACS@127.0.0.1:4242)``: how the destination is named in messages."""
        tls = ", TLS" if self.tls is not None else ""
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port}{tls})"

    @property
    def association(self) -> AssociationSettings:
        """Our side of an association with this destination: ``timeout_s`` bounds every wait."""
        return AssociationSettings.with_timeout(self.calling_ae_title, self.timeout_s, self.max_pdu)

    @property
    def peer(self) -> RemoteAE:
        tls_context = None if self.tls is None else client_context(self.tls)
        return RemoteAE(self.ae_title, self.host, self.port, tls_context)


# --- results ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SendResult:
    """Outcome of sending one file.

    ``ok`` is true only for a Success or Warning status. ``permanent`` says, for a
    failure, that retrying the same object to the same destination cannot help.
    ``transfer_syntax_uid`` is the syntax of the accepted context used (empty when
    nothing was sent).
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    status: int | None
    ok: bool
    error: str = ""
    permanent: bool = False
    transfer_syntax_uid: str = ""

    def to_error(self, destination: str, *, job_id: int | None = None, study_uid: str | None = None) -> SendError | None:
        """The failure as a :class:`SendError` (None when the object was stored)."""
        if self.ok:
            return None
        return SendError(
            self.error,
            destination=destination,
            status=self.status,
            permanent=self.permanent,
            job_id=job_id,
            study_uid=study_uid,
        )


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO (PS3.4 Annex A) to a destination."""

    destination: str
    ok: bool
    status: int | None
    error: str = ""
    duration_s: float = 0.0


# --- planning --------------------------------------------------------------------------
@dataclass(frozen=True)
class _ObjectHeader:
    """What the plan needs from a file (read without its pixel data)."""

    index: int
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def _needs_own_syntax(ts: UID) -> bool:
    """Compressed, deflated or big-endian objects are proposed in a context of their own syntax."""
    return ts.is_compressed or ts.is_deflated or not ts.is_little_endian


@dataclass(frozen=True)
class PresentationContextPlan:
    """One presentation context to propose: an abstract syntax and its transfer syntaxes."""

    sop_class_uid: str
    transfer_syntax_uids: tuple[str, ...]


def plan_contexts(objects: Sequence[tuple[str, str]]) -> list[PresentationContextPlan]:
    """The presentation contexts for ``(sop_class_uid, transfer_syntax_uid)`` pairs.

    Per SOP Class: one uncompressed context (the native little-endian syntaxes seen,
    then Explicit VR LE, then Implicit VR LE) and one context per compressed or
    big-endian syntax seen. Order follows first appearance.
    """
    native: dict[str, list[UID]] = {}
    own: dict[str, list[UID]] = {}
    for sop_class, ts_text in objects:
        ts = UID(ts_text)
        native.setdefault(sop_class, [])
        own.setdefault(sop_class, [])
        bucket = own[sop_class] if _needs_own_syntax(ts) else native[sop_class]
        if ts not in bucket:
            bucket.append(ts)
    plans: list[PresentationContextPlan] = []
    for sop_class in native:
        syntaxes: list[UID] = list(native[sop_class])
        syntaxes += [ts for ts in _FALLBACK_SYNTAXES if ts not in syntaxes]
        plans.append(PresentationContextPlan(sop_class, tuple(str(ts) for ts in syntaxes)))
        plans += [PresentationContextPlan(sop_class, (str(ts),)) for ts in own[sop_class]]
    return plans


def _chunk_by_contexts(headers: list[_ObjectHeader]) -> Iterator[tuple[list[_ObjectHeader], list[PresentationContextPlan]]]:
    """Split the batch so that no association proposes more than 128 contexts; all
    files of one SOP Class stay in the same association."""
    by_class: dict[str, list[_ObjectHeader]] = {}
    for header in headers:
        by_class.setdefault(str(header.sop_class_uid), []).append(header)
    chunk: list[_ObjectHeader] = []
    contexts: list[PresentationContextPlan] = []
    for members in by_class.values():
        plan = plan_contexts([(str(h.sop_class_uid), str(h.transfer_syntax_uid)) for h in members])
        if contexts and len(contexts) + len(plan) > MAX_PRESENTATION_CONTEXTS:
            yield chunk, contexts
            chunk, contexts = [], []
        chunk += members
        contexts += plan[:MAX_PRESENTATION_CONTEXTS]
    if chunk:
        yield chunk, contexts


def _read_header(index: int, path: Path) -> _ObjectHeader | SendResult:
    """The header of a Part 10 file, or a permanent failure result."""
    try:
        ds = read_leading(path, 0x00080018)  # up to SOPInstanceUID; a Deflated SEG is not inflated whole
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        return SendResult(path, "", "", None, False, f"cannot read {path} as a DICOM Part 10 file: {exc}", True)
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None)
    sop_class = ds.get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", None)
    sop_instance = ds.get("SOPInstanceUID") or getattr(meta, "MediaStorageSOPInstanceUID", None)
    missing = [
        name
        for name, value in (
            ("TransferSyntaxUID (0002,0010)", ts),
            ("SOPClassUID (0008,0016)", sop_class),
            ("SOPInstanceUID (0008,0018)", sop_instance),
        )
        if not value
    ]
    if missing:
        return SendResult(
            path,
            str(sop_instance or ""),
            str(sop_class or ""),
            None,
            False,
            f"{path} lacks {', '.join(missing)}; a C-STORE needs all of them (PS3.10 7.1, PS3.4 B.4)",
            True,
        )
    invalid = [
        f"{name} {value!s}"
        for name, value in (("TransferSyntaxUID", ts), ("SOPClassUID", sop_class))
        if not is_valid_uid(str(value).strip())  # as pydicom.uid.UID reads it
    ]
    if invalid:
        return SendResult(
            path,
            str(sop_instance),
            str(sop_class),
            None,
            False,
            f"{path} has an invalid {', '.join(invalid)} (allowed: a UID, PS3.5 9.1)",
            True,
        )
    return _ObjectHeader(index, path, UID(str(sop_class)), str(sop_instance), UID(str(ts)))


# --- association ---------------------------------------------------------------------
def _associate(ae: AE, destination: Destination) -> Association:
    """Open an association or raise a transient :class:`SendError` naming the destination.

    The returned association may be closed when the peer accepted it with none of the
    proposed presentation contexts (then ``accepted_contexts`` is empty)."""
    received: list[object] = []

    def handle_acse_recv(event: evt.Event) -> None:
        received.append(event.primitive)  # type: ignore[attr-defined]

    assoc = request_association(ae, destination.peer, evt_handlers=[(evt.EVT_ACSE_RECV, handle_acse_recv)])
    if assoc.is_established:
        return assoc
    if assoc.rejected_contexts and not assoc.accepted_contexts and not assoc.is_rejected:
        # PS3.8 9.3.3.2: the peer accepted the association but none of the proposed
        # contexts; pynetdicom then aborts. The caller reports each SOP Class as refused.
        return assoc
    if assoc.is_rejected:
        reason = ""
        for primitive in received:
            if getattr(primitive, "result_str", None) and getattr(primitive, "reason_str", None):
                reason = f": {primitive.result_str}, {primitive.reason_str}"  # type: ignore[attr-defined]
        message = (
            f"destination {destination.label} rejected the association from calling AE "
            f"{destination.calling_ae_title!r}{reason}"
        )
    elif received:
        message = (
            f"destination {destination.label} aborted the association from calling AE "
            f"{destination.calling_ae_title!r} (no presentation context accepted, or the peer gave up)"
        )
    else:
        message = (
            f"cannot open an association with destination {destination.label}: connection refused, "
            f"unreachable or no answer within {destination.timeout_s:g} s"
        )
    raise SendError(message, destination=destination.name, permanent=False)


def _accepted_by_class(assoc: Association) -> dict[str, list[UID]]:
    accepted: dict[str, list[UID]] = {}
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax and cx.transfer_syntax:
            accepted.setdefault(str(cx.abstract_syntax), []).append(UID(cx.transfer_syntax[0]))
    return accepted


def _decompress(ds: Dataset) -> None:
    """Decompress ``ds`` in place to Explicit VR Little Endian, keeping its SOPInstanceUID.

    pydicom's ``decompress`` leaves a 1-bit image (a BINARY Segmentation in JPEG 2000, PS3.5 8.2.4
    and A.4.4) with one byte per pixel under BitsAllocated 1; native 1-bit Pixel Data is packed 8
    pixels a byte, frames contiguous (PS3.5 8.1.1), so those bytes are packed again.
    """
    frames = ds.pixel_array if int(ds.get("BitsAllocated", 0)) == 1 else None
    # A lossless change of transfer syntax keeps the instance (PS3.5 10.1); pydicom 3 would give it a new
    # SOPInstanceUID by default, breaking the outbox's record and every reference to it (the SR's to the SEG).
    ds.decompress(generate_instance_uid=False)
    if frames is not None:
        ds.PixelData = pack_bits(frames.ravel())
        ds["PixelData"].VR = "OB"


def _prepare_dataset(
    header: _ObjectHeader, accepted: list[UID], destination: Destination
) -> tuple[Dataset | Path, UID]:
    """The file's path when the peer accepted its own syntax (sent as stored); else the file read and
    made sendable in one of the accepted syntaxes (decompressing when only an uncompressed syntax was
    accepted); raise a permanent SendError otherwise."""
    sop_name = header.sop_class_uid.name
    if not accepted:
        raise SendError(
            f"destination {destination.label} refused SOP class {sop_name} "
            f"({header.sop_class_uid}); nothing sent",
            destination=destination.name,
            permanent=True,
        )
    ts = header.transfer_syntax_uid
    if ts in accepted:
        return header.path, ts  # sent as stored, in chunks, never decoded (module docstring)
    uncompressed_le = [a for a in accepted if not _needs_own_syntax(a)]
    try:
        ds = dcmread(header.path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise SendError(
            f"cannot read {header.path} as a DICOM Part 10 file: {exc}", destination=destination.name, permanent=True
        ) from exc
    if not _needs_own_syntax(ts) and uncompressed_le:
        return ds, uncompressed_le[0]
    if ts.is_deflated and uncompressed_le:
        # dcmread inflated the dataset: it is sent in the accepted native syntax (PS3.5 A.5).
        ds.file_meta.TransferSyntaxUID = uncompressed_le[0]
        LOGGER.info(
            "SOP Instance UID %s sent inflated (%s) to %s: %s not accepted",
            header.sop_instance_uid, uncompressed_le[0].name, destination.name, ts.name,
        )
        return ds, uncompressed_le[0]
    if ts.is_compressed and uncompressed_le:
        try:
            _decompress(ds)
        except Exception as exc:  # pydicom raises several types from its pixel backends
            raise SendError(
                f"destination {destination.label} accepted {sop_name} only uncompressed and "
                f"{header.path} ({ts.name}) could not be decompressed: {exc}; nothing sent",
                destination=destination.name,
                permanent=True,
            ) from exc
        LOGGER.info(
            "decompressed SOP Instance UID %s from %s for %s (compressed syntax not accepted)",
            header.sop_instance_uid,
            ts.name,
            destination.name,
        )
        return ds, uncompressed_le[0]
    raise SendError(
        f"destination {destination.label} accepted SOP class {sop_name} only with "
        f"{', '.join(a.name for a in accepted)}; {header.path} is {ts.name} and cannot be "
        "converted; nothing sent",
        destination=destination.name,
        permanent=True,
    )


def _store_one(assoc: Association, header: _ObjectHeader, accepted: list[UID], destination: Destination) -> SendResult:
    """C-STORE one object on an open association; never raises."""
    sop_class = str(header.sop_class_uid)

    def failure(error: str, status: int | None, permanent: bool, ts: str = "") -> SendResult:
        return SendResult(header.path, header.sop_instance_uid, sop_class, status, False, error, permanent, ts)

    try:
        ds, ts = _prepare_dataset(header, accepted, destination)
    except SendError as exc:
        return failure(exc.message, None, exc.permanent)
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError) as exc:
        return failure(f"cannot encode {header.path} for {destination.label}: {exc}", None, True, str(ts))
    except RuntimeError as exc:
        return failure(f"association with destination {destination.label} was lost: {exc}", None, False, str(ts))
    except Exception as exc:  # noqa: BLE001 - never raise for one object; retried, then given up
        LOGGER.exception("unexpected error sending SOP Instance UID %s to %s", header.sop_instance_uid, destination.name)
        return failure(f"unexpected error sending to destination {destination.label}: {exc!r}", None, False, str(ts))
    status = rsp.get("Status") if rsp else None
    if status is None:
        return failure(
            f"no C-STORE response from destination {destination.label} within {destination.timeout_s:g} s "
            "(association aborted or timed out)",
            None,
            False,
            str(ts),
        )
    status = int(status)
    if is_stored(status):
        error = "" if status == STATUS_SUCCESS else f"stored with warning {describe_status(status)}"
        return SendResult(header.path, header.sop_instance_uid, sop_class, status, True, error, False, str(ts))
    comment = rsp.get("ErrorComment")
    return failure(
        f"destination {destination.label} answered {describe_status(status)} for "
        f"{header.sop_class_uid.name}" + (f": {comment}" if comment else ""),
        status,
        is_permanent_failure(status),
        str(ts),
    )


def send_files(paths: Sequence[Path], destination: Destination) -> list[SendResult]:
    """C-STORE ``paths`` to ``destination`` over one association (PS3.4 Annex B).

    Returns one :class:`SendResult` per path, in order. Never raises for a failure of
    an object or of the association.
    """
    results: dict[int, SendResult] = {}
    headers: list[_ObjectHeader] = []
    for index, path in enumerate(paths):
        read = _read_header(index, Path(path))
        if isinstance(read, SendResult):
            results[index] = read
        else:
            headers.append(read)

    for chunk, contexts in _chunk_by_contexts(headers):
        ae = create_ae(destination.association)
        for plan in contexts:
            ae.add_requested_context(plan.sop_class_uid, list(plan.transfer_syntax_uids))
        try:
            assoc = _associate(ae, destination)
        except SendError as exc:
            for header in chunk:
                results[header.index] = SendResult(
                    header.path, header.sop_instance_uid, str(header.sop_class_uid), None, False, exc.message, False
                )
            continue
        try:
            accepted = _accepted_by_class(assoc)
            LOGGER.debug(
                "association with %s: %d contexts proposed, %d accepted",
                destination.name,
                len(contexts),
                len(assoc.accepted_contexts),
            )
            for header in chunk:
                class_accepted = accepted.get(str(header.sop_class_uid), [])
                if class_accepted and not assoc.is_established:
                    results[header.index] = SendResult(
                        header.path,
                        header.sop_instance_uid,
                        str(header.sop_class_uid),
                        None,
                        False,
                        f"association with destination {destination.label} was lost before this object was sent",
                        False,
                    )
                    continue
                results[header.index] = _store_one(assoc, header, class_accepted, destination)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    return [results[i] for i in range(len(paths))]


def echo(destination: Destination) -> EchoResult:
    """C-ECHO ``destination`` (Verification SOP Class, PS3.4 Annex A); never raises."""
    started = time.monotonic()
    ae = create_ae(destination.association)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(ae, destination)
    except SendError as exc:
        return EchoResult(destination.name, False, None, exc.message, time.monotonic() - started)
    try:
        if not assoc.is_established:
            return EchoResult(
                destination.name,
                False,
                None,
                f"destination {destination.label} refused SOP class Verification ({Verification}); "
                "it does not answer C-ECHO",
                time.monotonic() - started,
            )
        rsp = assoc.send_c_echo()
        status = rsp.get("Status") if rsp else None
        if status is None:
            return EchoResult(
                destination.name,
                False,
                None,
                f"no C-ECHO response from destination {destination.label} within {destination.timeout_s:g} s",
                time.monotonic() - started,
            )
        status = int(status)
        ok = status == STATUS_SUCCESS
        error = "" if ok else f"destination {destination.label} answered C-ECHO with {describe_status(status)}"
        return EchoResult(destination.name, ok, status, error, time.monotonic() - started)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
