"""scp.integrity (unit) and the C-STORE handler's integrity on receipt (issue 25, item 3), driven by a
pynetdicom SCU against a real ingress: truncated pixel data refused and recorded, the complete copy
stored afterwards, an invalid stored copy replaced, a different valid copy recorded as a conflict,
oversized elements and instances refused."""

from __future__ import annotations

import zlib

import numpy as np
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

from scp import status as st
from scp.integrity import IntegrityLimits, check_dataset, expected_pixel_bytes, file_dataset_sha256
from scp.refusals import KIND_STORE
from scp.spool import instance_path, write_instance
from scp.types import ReceivedInstance
from tests.scp.dicom_factory import base_dataset, encode_dataset

STUDY = "1.2.826.0.1.3680043.8.498.25"
SERIES = "1.2.826.0.1.3680043.8.498.25.1"
NO_LIMITS = IntegrityLimits()


def _ct(rows: int = 16, cols: int = 16, *, sop_uid: str | None = None, seed: int = 0) -> Dataset:
    ds = base_dataset(CTImageStorage, STUDY, SERIES, "CT")
    if sop_uid:
        ds.SOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.random.default_rng(seed).integers(-1000, 1000, (rows, cols), dtype=np.int16).tobytes()
    return ds



def _truncate(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


# -- unit --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_complete_pixel_data_passes_and_truncated_fails_in_every_native_syntax(ts: str) -> None:
    assert check_dataset(encode_dataset(_ct(), ts), ts, NO_LIMITS) is None
    problem = check_dataset(encode_dataset(_truncate(_ct()), ts), ts, NO_LIMITS)
    assert problem is not None and problem.status == st.STATUS_PIXEL_DATA_LENGTH
    assert "256 bytes" in problem.reason and "512 bytes" in problem.reason  # seen and allowed
    assert len(problem.comment) <= 64


def test_expected_length_counts_frames_samples_and_single_bits() -> None:
    assert expected_pixel_bytes(512, 512, 1, 16, 1) == 524288
    assert expected_pixel_bytes(3, 3, 3, 8, 2) == 54
    assert expected_pixel_bytes(3, 3, 1, 8, 1) == 10  # 9 bytes padded to even
    assert expected_pixel_bytes(10, 10, 1, 1, 3) == 38  # 300 bits = 37.5 bytes -> 38


def test_multiframe_pixel_data_must_hold_every_frame() -> None:
    ds = _ct(8, 8)
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(8 * 8 * 2 * 3)
    assert check_dataset(encode_dataset(ds), ExplicitVRLittleEndian, NO_LIMITS) is None
    ds.PixelData = bytes(8 * 8 * 2 * 2)
    problem = check_dataset(encode_dataset(ds), ExplicitVRLittleEndian, NO_LIMITS)
    assert problem is not None and "NumberOfFrames 3" in problem.reason


def test_an_instance_without_pixel_data_passes() -> None:
    ds = base_dataset(CTImageStorage, STUDY, SERIES, "SR")
    assert check_dataset(encode_dataset(ds), ExplicitVRLittleEndian, NO_LIMITS) is None


@pytest.mark.filterwarnings("ignore:The value length")
def test_a_large_text_element_is_refused_even_inside_an_undefined_length_sequence() -> None:
    limits = IntegrityLimits(max_element_bytes=1024)
    ds = _ct()
    ds.ImageComments = "x" * 4000
    problem = check_dataset(encode_dataset(ds), ExplicitVRLittleEndian, limits)
    assert problem is not None and problem.status == st.STATUS_ELEMENT_TOO_LARGE
    assert "(0020,4000)" in problem.reason and "4000 bytes" in problem.reason and "1024" in problem.reason
    nested = _ct()
    item = Dataset()
    item.CodeMeaning = "y" * 3000
    nested.ReferencedImageSequence = [item]
    nested["ReferencedImageSequence"].is_undefined_length = True
    problem = check_dataset(encode_dataset(nested), ExplicitVRLittleEndian, limits)
    assert problem is not None and "(0008,0104)" in problem.reason
    # the pixel data itself is not bound by max_element_bytes
    assert check_dataset(encode_dataset(_ct(64, 64)), ExplicitVRLittleEndian, limits) is None


def test_instance_size_limit_and_a_deflate_bomb() -> None:
    data = encode_dataset(_ct())
    problem = check_dataset(data, ExplicitVRLittleEndian, IntegrityLimits(max_instance_bytes=len(data) - 1))
    assert problem is not None and problem.status == st.STATUS_INSTANCE_TOO_LARGE
    bomb = _ct(512, 512)
    bomb.PixelData = bytes(512 * 512 * 2)  # zeros: deflates to ~0.5 KB
    deflated = encode_dataset(bomb, DeflatedExplicitVRLittleEndian)
    assert len(deflated) < 10_000
    problem = check_dataset(deflated, DeflatedExplicitVRLittleEndian, IntegrityLimits(max_instance_bytes=100_000))
    assert problem is not None and problem.status == st.STATUS_INSTANCE_TOO_LARGE


# -- through the handler -------------------------------------------------------------------------


def _send(port: int, *datasets: Dataset, ts: str = ExplicitVRLittleEndian, calling: str = "TESTSCU") -> list[Dataset]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="THIGHNODE")
    assert assoc.is_established
    try:
        out = []
        for ds in datasets:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
            out.append(assoc.send_c_store(ds))
        return out
    finally:
        assoc.release()


@pytest.mark.integration
def test_truncated_first_copy_is_refused_and_recorded_then_the_complete_copy_is_stored(start_server) -> None:
    server = start_server()
    sop = generate_uid()
    [truncated] = _send(server.port, _truncate(_ct(sop_uid=sop)))
    assert truncated.Status == st.STATUS_PIXEL_DATA_LENGTH
    assert "expected 512" in truncated.ErrorComment
    assert not server.index.has(sop)
    [refusal] = server.refusals.recent()
    assert (refusal.kind, refusal.status, refusal.sop_instance_uid) == (KIND_STORE, st.STATUS_PIXEL_DATA_LENGTH, sop)
    assert (refusal.calling_ae, refusal.peer_address) == ("TESTSCU", "127.0.0.1")
    assert "Pixel Data (7FE0,0010) is 256 bytes" in refusal.reason
    assert server.refusals.counts() == {"0xC003": 1}

    complete = _ct(sop_uid=sop)
    [ok] = _send(server.port, complete)
    assert ok.Status == st.STATUS_SUCCESS
    stored = server.index.get_instance(sop)
    assert stored is not None
    assert np.array_equal(dcmread(stored.path).pixel_array, complete.pixel_array)


def _plant_invalid_copy(server, sop: str) -> ReceivedInstance:
    """A truncated copy in the spool and the index, as an older node (or a C-GET) stored it."""
    from scp.spool import file_head

    ds = _truncate(_ct(sop_uid=sop))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = file_head(meta, "OLDSCU") + encode_dataset(ds)
    path = write_instance(server.config.spool_dir, STUDY, SERIES, sop, data)
    inst = ReceivedInstance(sop, CTImageStorage, STUDY, SERIES, "CT", ExplicitVRLittleEndian, path, len(data),
                            "OLDSCU", "127.0.0.1", 1000.0)
    assert server.index.record(inst)
    return inst


@pytest.mark.integration
def test_a_complete_duplicate_replaces_an_invalid_stored_copy_and_the_study_moves_on(start_server) -> None:
    server = start_server()
    sop = generate_uid()
    _plant_invalid_copy(server, sop)
    before = server.index.activity()[0].last_received_at
    complete = _ct(sop_uid=sop)
    [ok] = _send(server.port, complete)
    assert ok.Status == st.STATUS_SUCCESS
    stored = server.index.get_instance(sop)
    assert stored is not None and stored.calling_ae == "TESTSCU"
    assert stored.path == instance_path(server.config.spool_dir, STUDY, SERIES, sop)
    assert np.array_equal(dcmread(stored.path).pixel_array, complete.pixel_array)
    [activity] = server.index.activity()
    assert activity.instance_count == 1 and activity.last_received_at > before  # the job store sees it
    assert server.index.conflicts() == []


@pytest.mark.integration
def test_same_bytes_are_a_plain_duplicate_and_other_valid_bytes_a_recorded_conflict(start_server) -> None:
    server = start_server()
    sop = generate_uid()
    first = _ct(sop_uid=sop, seed=1)
    [a] = _send(server.port, first)
    kept = file_dataset_sha256(server.index.get_instance(sop).path)
    [b] = _send(server.port, _ct(sop_uid=sop, seed=1))
    assert (a.Status, b.Status) == (st.STATUS_SUCCESS, st.STATUS_SUCCESS)
    assert server.index.conflicts() == []
    other = _ct(sop_uid=sop, seed=2)
    [c] = _send(server.port, other, calling="OTHERSCU")
    assert c.Status == st.STATUS_WARNING_ELEMENTS_DISCARDED and st.is_stored(c.Status)
    assert "first copy kept" in c.ErrorComment
    [conflict] = server.index.conflicts()
    assert (conflict.sop_instance_uid, conflict.study_instance_uid, conflict.calling_ae) == (sop, STUDY, "OTHERSCU")
    assert conflict.stored_sha256 == kept and conflict.received_sha256 != kept
    stored = server.index.get_instance(sop)
    assert np.array_equal(dcmread(stored.path).pixel_array, first.pixel_array)  # the first copy stays
    assert server.refusals.recent() == []


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_oversized_element_or_instance_is_refused_with_a_named_status(start_server) -> None:
    server = start_server(max_element_bytes=64 * 1024, max_instance_bytes=256 * 1024)
    text = _ct()
    text.ImageComments = "A" * (200 * 1024)
    big = _ct(400, 400)  # 320 KB of pixels: over the instance limit, under no element limit
    r_text, r_big, r_ok = _send(server.port, text, big, _ct())
    assert r_text.Status == st.STATUS_ELEMENT_TOO_LARGE and "(0020,4000)" in r_text.ErrorComment
    assert r_big.Status == st.STATUS_INSTANCE_TOO_LARGE
    assert r_ok.Status == st.STATUS_SUCCESS
    assert not server.index.has(text.SOPInstanceUID) and not server.index.has(big.SOPInstanceUID)
    assert server.refusals.counts() == {"0xC004": 1, "0xC005": 1}


@pytest.mark.integration
def test_rejected_associations_are_recorded(start_server) -> None:
    server = start_server(allowed_calling_aets=("CT1",))
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="THIGHNODE")
    assert assoc.is_rejected
    [refusal] = server.refusals.recent()
    assert (refusal.kind, refusal.calling_ae, refusal.status) == ("association", "INTRUDER", None)
    assert "calling AE not recognised" in refusal.reason


def test_the_c_get_sink_refuses_a_truncated_instance_like_the_ingress(tmp_path) -> None:  # noqa: ANN001
    from scp.errors import IngressError
    from scp.index import InstanceIndex
    from scp.instance_sink import store_into
    from tests.scp.dicom_factory import c_get_part10 as part10

    with InstanceIndex(tmp_path / "node.db") as index:
        store = store_into(index, tmp_path / "spool", "PACS")
        sop = generate_uid()
        with pytest.raises(IngressError, match="Pixel Data \\(7FE0,0010\\) is 256 bytes"):
            store(part10(_truncate(_ct(sop_uid=sop))))
        assert not index.has(sop)
        store(part10(_ct(sop_uid=sop)))
        assert index.has(sop)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("limits", [NO_LIMITS, IntegrityLimits(max_element_bytes=100)])
def test_a_stream_cut_inside_the_pixel_data_is_refused(ts: str, limits: IntegrityLimits) -> None:
    """The Pixel Data element still declares its full length, but the bytes stop early."""
    plain = encode_dataset(_ct(), ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts)[:-200]
    if ts == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        plain = c.compress(plain) + c.flush()
    problem = check_dataset(plain, ts, limits)
    assert problem is not None and problem.status == st.STATUS_PIXEL_DATA_LENGTH
    assert "(7FE0,0010) declares 512 bytes but the dataset ends 312 bytes into it" in problem.reason
