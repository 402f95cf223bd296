"""The storage side of a C-GET: the instances a PACS sends back on our association.

During a C-GET (PS3.4 C.4.3) the PACS sends each instance as a C-STORE sub-operation
on the association we opened; we act as Storage SCP for it (PS3.4 B.2.3, SCP/SCU Role
Selection PS3.7 D.3.3.4). :func:`handle_get_store` hands each one, as a Part 10 file,
to an :data:`InstanceSink`; :func:`store_into` builds the sink that stores them exactly
like the ingress does (spool + index, durable, duplicates ignored).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydicom import dcmread
from pynetdicom import AE, build_role

from scp.errors import IngressError, QuerySourceError
from scp.integrity import IntegrityLimits, check_dataset, split_part10
from scp.pacs import read_text
from scp.spool import file_head, write_instance
from scp.status import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, STATUS_PROCESSING_FAILURE, STATUS_SUCCESS
from scp.types import ReceivedInstance
from scp.validate import validate_ae_title, validate_uid

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    from scp.index import InstanceIndex

LOGGER = logging.getLogger(__name__)

#: Receives each instance of a C-GET: a complete DICOM Part 10 file (PS3.10 7.1) whose
#: dataset is byte for byte what the PACS sent. Raising refuses that instance (its
#: C-STORE sub-operation is answered with a failure and counted as failed).
InstanceSink = Callable[[bytes], None]


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
        data = file_head(event.file_meta, event.assoc.acceptor.ae_title) + stream.getvalue()
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
    limits: IntegrityLimits | None = None,
) -> InstanceSink:
    """An :data:`InstanceSink` that stores each instance exactly like the ingress SCP does.

    The file is written durably with :func:`scp.spool.write_instance` to
    ``<spool_dir>/<study>/<series>/<sop>.dcm`` and recorded with
    :meth:`InstanceIndex.record` (``calling_ae`` is recorded as the sender: the PACS's
    AE title; ``peer_address`` its address). An instance whose SOP Instance UID is
    already in the index is ignored (not written again). Raises (so the sub-operation
    is answered with a failure) when the header cannot be read, a UID is invalid, the
    instance fails the integrity check of the ingress (:func:`scp.integrity.check_dataset`
    with ``limits``: sizes, native Pixel Data length) or the write fails.
    """
    limits = limits or IntegrityLimits()
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
        ts, dataset = split_part10(BytesIO(data))
        problem = check_dataset(dataset, ts, limits)
        if problem is not None:
            raise IngressError(f"SOP Instance {sop_uid} refused: {problem.reason}")
        if index.has(sop_uid):
            LOGGER.info("SOP Instance %s already received: not written again", sop_uid)
            return
        study_uid = validate_uid(read_text(ds, "StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(read_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
        path = write_instance(spool, study_uid, series_uid, sop_uid, data)
        index.record(
            ReceivedInstance(
                sop_instance_uid=sop_uid,
                sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")).strip(" \x00"),
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                modality=read_text(ds, "Modality"),
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                path=path,
                size_bytes=len(data),
                calling_ae=calling_ae,
                peer_address=peer_address,
                received_at=received_at,
            )
        )

    return store


def propose_storage_as_scp(
    ae: AE, sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]
) -> list[SCP_SCU_RoleSelectionNegotiation]:
    """Propose each storage SOP class on ``ae`` and return the SCP/SCU Role Selection items
    that let the PACS send C-STORE sub-operations of a C-GET to us (PS3.4 C.4.3, PS3.7 D.3.3.4)."""
    for uid in sop_classes:
        ae.add_requested_context(uid, list(transfer_syntaxes))
    return [build_role(uid, scp_role=True) for uid in sop_classes]

