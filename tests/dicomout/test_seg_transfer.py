"""The compressed SEG on the wire (issue 24): negotiated per destination, recorded per outbox item.

A deflated (or JPEG 2000) BINARY SEG goes to a destination that accepts its syntax as it is, and
inflated / decompressed to one that accepts only uncompressed syntaxes; either way what arrives reads
back (highdicom) to the label map, frame positions included. Orthanc stores it and gives it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    PYDICOM_IMPLEMENTATION_UID,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage

from dicomout.outbox import STATE_SENT, Outbox, send_pending
from dicomout.seg import build_seg
from dicomout.sender import Destination, plan_contexts, send_files
from pipeline.types import Segmentation, Volume
from scp.status import STATUS_SUCCESS
from tests.dicomout.test_seg import EQUIPMENT, check_frames_against_label_map, make_case
from tests.support.dciodvfy import run_dciodvfy
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

SEG = str(SegmentationStorage)


@dataclass
class _Received:
    datasets: list[Dataset] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)


def _start_seg_scp(syntaxes: list[str]) -> tuple[object, Destination, _Received]:
    received = _Received()

    def handle_store(event: evt.Event) -> int:
        received.transfer_syntaxes.append(str(event.context.transfer_syntax))
        received.datasets.append(event.dataset)
        return STATUS_SUCCESS

    ae = AE(ae_title="SEGSCP")
    ae.add_supported_context(SegmentationStorage, syntaxes)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    return server, Destination("segscp", "SEGSCP", "127.0.0.1", port, timeout_s=20.0), received


@pytest.fixture
def uncompressed_only_scp() -> Iterator[tuple[Destination, _Received]]:
    """A Storage SCP for Segmentation Storage in Explicit / Implicit VR Little Endian only."""
    server, destination, received = _start_seg_scp([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        yield destination, received
    finally:
        server.shutdown()  # type: ignore[attr-defined]


@pytest.fixture
def deflate_scp() -> Iterator[tuple[Destination, _Received]]:
    """A Storage SCP that accepts Segmentation Storage deflated (and uncompressed)."""
    server, destination, received = _start_seg_scp(
        [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    try:
        yield destination, received
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def _seg_file(tmp_path: Path, transfer_syntax: str) -> tuple[Path, list[Path], Volume, Segmentation]:
    paths, volume, seg = make_case(tmp_path, "HFS-reversed-files")
    out = tmp_path / "seg.dcm"
    build_seg(volume, seg, paths, transfer_syntax_uid=transfer_syntax, **EQUIPMENT).save_as(out)
    assert dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    return out, paths, volume, seg


def _write_received(ds: Dataset, transfer_syntax: str, path: Path) -> Path:
    """The dataset a C-STORE SCP received, as the Part 10 file it would store."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflated_seg_is_proposed_in_a_context_of_its_own_beside_the_uncompressed_one() -> None:
    plans = plan_contexts([(SEG, DeflatedExplicitVRLittleEndian)])
    assert [p.transfer_syntax_uids for p in plans] == [
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        (DeflatedExplicitVRLittleEndian,),
    ]


@pytest.mark.integration
@pytest.mark.parametrize("transfer_syntax", [DeflatedExplicitVRLittleEndian, JPEG2000Lossless])
def test_destination_accepting_only_uncompressed_receives_a_valid_seg_equal_to_the_label_map(
    tmp_path: Path, uncompressed_only_scp: tuple[Destination, _Received], transfer_syntax: str
) -> None:
    destination, received = uncompressed_only_scp
    seg_path, paths, volume, seg = _seg_file(tmp_path, transfer_syntax)
    outbox = Outbox(tmp_path / "outbox.db")
    item_id = outbox.enqueue(
        seg_path, destination.name, job_id=7, study_uid=volume.study_instance_uid, sop_class_uid=SEG,
        sop_instance_uid=str(dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID),
    )
    assert send_pending(outbox, {destination.name: destination}) == 1
    item = outbox.get(item_id)
    assert item is not None and item.state == STATE_SENT
    (ts,) = received.transfer_syntaxes
    assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert item.transfer_syntax_uid == ts
    # A lossless change of transfer syntax is the same instance (PS3.5 10.1): the SR references this UID.
    assert str(received.datasets[0].SOPInstanceUID) == item.sop_instance_uid
    stored = _write_received(received.datasets[0], ts, tmp_path / "received.dcm")
    check_frames_against_label_map(stored, paths, volume, seg)
    report = run_dciodvfy(stored)
    assert report.errors == (), report.output


@pytest.mark.integration
def test_destination_accepting_deflate_receives_it_deflated(
    tmp_path: Path, deflate_scp: tuple[Destination, _Received]
) -> None:
    destination, received = deflate_scp
    seg_path, paths, volume, seg = _seg_file(tmp_path, DeflatedExplicitVRLittleEndian)
    (result,) = send_files([seg_path], destination)
    assert result.ok and result.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert received.transfer_syntaxes == [DeflatedExplicitVRLittleEndian]
    stored = _write_received(received.datasets[0], DeflatedExplicitVRLittleEndian, tmp_path / "received.dcm")
    check_frames_against_label_map(stored, paths, volume, seg)


@pytest.mark.integration
@pytest.mark.parametrize("transfer_syntax", [DeflatedExplicitVRLittleEndian, JPEG2000Lossless])
def test_orthanc_stores_the_compressed_seg_and_gives_back_the_label_map(tmp_path: Path, transfer_syntax: str) -> None:
    seg_path, paths, volume, seg = _seg_file(tmp_path, transfer_syntax)
    with OrthancServer(tmp_path) as orthanc:
        destination = Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port, timeout_s=20.0)
        (result,) = send_files([seg_path], destination)
        assert result.ok, result.error
        (instance,) = orthanc.instances()
        stored_syntax = orthanc.instance_metadata(instance, "TransferSyntax")
        fetched = tmp_path / "from_orthanc.dcm"
        fetched.write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
    assert result.transfer_syntax_uid == stored_syntax == transfer_syntax
    assert dcmread(fetched, stop_before_pixels=True).file_meta.TransferSyntaxUID == stored_syntax
    # Frames, their positions and the volume rebuilt from the SEG's own geometry equal the label map.
    check_frames_against_label_map(fetched, paths, volume, seg)
