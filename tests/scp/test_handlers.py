"""scp.handlers: header reading (unit) and C-STORE failure statuses driven by a pynetdicom SCU."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from scp import handlers
from scp.handlers import read_header
from tests.scp.dicom_factory import base_dataset, encode_dataset

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = "1.2.826.0.1.3680043.8.498.7.1"



def _ct_dataset() -> Dataset:
    ds = base_dataset(CTImageStorage, STUDY, SERIES, "CT")
    seq_item = Dataset()
    seq_item.ReferencedSOPClassUID = CTImageStorage
    seq_item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [seq_item]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 8
    return ds


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
)
def test_read_header_in_every_uncompressed_syntax(transfer_syntax: str) -> None:
    data = encode_dataset(_ct_dataset(), transfer_syntax)
    header = read_header(BytesIO(data), transfer_syntax)
    assert header == handlers.InstanceHeader(STUDY, SERIES, "CT")


def test_read_header_reports_missing_attributes_as_empty() -> None:
    ds = _ct_dataset()
    del ds.StudyInstanceUID
    del ds.Modality
    header = read_header(BytesIO(encode_dataset(ds, ExplicitVRLittleEndian)), ExplicitVRLittleEndian)
    assert header == handlers.InstanceHeader("", SERIES, "")


def test_statuses_are_named_and_distinct() -> None:
    names = [n for n in dir(handlers) if n.startswith("STATUS_")]
    values = [getattr(handlers, n) for n in names]
    assert len(set(values)) == len(values)
    assert handlers.STATUS_OUT_OF_RESOURCES == 0xA700
    assert 0xC000 <= handlers.STATUS_MISSING_UID <= 0xCFFF
    assert 0xC000 <= handlers.STATUS_INVALID_UID <= 0xCFFF


def _send(port: int, ds: Dataset) -> Dataset:
    """Send one dataset with a pynetdicom SCU; return the C-STORE response status dataset."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ds.file_meta.TransferSyntaxUID])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="THIGHNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status


def _dataset_with_meta(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


@pytest.mark.integration
def test_missing_study_uid_answers_cannot_understand_and_writes_nothing(start_server) -> None:
    server = start_server()
    ds = _ct_dataset()
    del ds.StudyInstanceUID
    status = _send(server.port, _dataset_with_meta(ds))
    assert status.Status == handlers.STATUS_MISSING_UID
    assert "StudyInstanceUID" in status.ErrorComment
    assert not server.index.has(ds.SOPInstanceUID)
    assert list(server.config.spool_dir.rglob("*.dcm")) == []


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_series_uid_answers_cannot_understand(start_server) -> None:
    server = start_server()
    ds = _ct_dataset()
    ds.SeriesInstanceUID = "1.2.03.4"
    status = _send(server.port, _dataset_with_meta(ds))
    assert status.Status == handlers.STATUS_INVALID_UID
    assert list(server.config.spool_dir.rglob("*")) == []


@pytest.mark.integration
def test_handler_never_raises_when_the_index_fails(start_server) -> None:
    server = start_server()
    server.index.close()  # every index call now raises
    ds = _ct_dataset()
    status = _send(server.port, _dataset_with_meta(ds))
    assert status.Status == handlers.STATUS_PROCESSING_FAILURE


@pytest.mark.integration
def test_stored_file_has_our_file_meta(start_server) -> None:
    server = start_server()
    ds = _ct_dataset()
    status = _send(server.port, _dataset_with_meta(ds))
    assert status.Status == handlers.STATUS_SUCCESS
    [inst] = server.index.instances(STUDY)
    stored = dcmread(inst.path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert inst.path == server.config.spool_dir / STUDY / SERIES / f"{ds.SOPInstanceUID}.dcm"
    assert inst.size_bytes == Path(inst.path).stat().st_size
    assert (inst.calling_ae, inst.peer_address, inst.modality) == ("TESTSCU", "127.0.0.1", "CT")


@pytest.mark.integration
@pytest.mark.parametrize("transfer_syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_deflated_and_big_endian_are_stored_as_sent(start_server, transfer_syntax: str) -> None:
    server = start_server()
    ds = _ct_dataset()
    status = _send(server.port, _dataset_with_meta(ds, transfer_syntax))
    assert status.Status == handlers.STATUS_SUCCESS
    [inst] = server.index.instances(STUDY)
    assert (inst.transfer_syntax_uid, inst.series_instance_uid, inst.modality) == (transfer_syntax, SERIES, "CT")
    stored = dcmread(inst.path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert (
        stored.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    )
