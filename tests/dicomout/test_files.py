"""write_part10 (dicomout.files) writes the file pydicom's save_as writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicomout import files
from dicomout.files import write_part10
from dicomout.seg import build_seg
from tests.dicomout.test_seg import EQUIPMENT, make_case


@pytest.mark.parametrize(
    "seg_type,transfer_syntax,highdicom_frames",
    [
        ("BINARY", DeflatedExplicitVRLittleEndian, False),
        ("BINARY", ExplicitVRLittleEndian, False),
        ("BINARY", DeflatedExplicitVRLittleEndian, True),
        ("LABELMAP", DeflatedExplicitVRLittleEndian, True),
        ("LABELMAP", ExplicitVRLittleEndian, True),
        ("LABELMAP", RLELossless, True),  # encapsulated: left to pydicom
        ("BINARY", JPEG2000Lossless, True),
    ],
)
def test_write_part10_equals_save_as(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seg_type: str, transfer_syntax: str, highdicom_frames: bool
) -> None:
    monkeypatch.setattr(files, "CHUNK_BYTES", 1000)  # several chunks, one not a multiple of a frame
    paths, volume, seg = make_case(tmp_path, "HFS")
    ds = build_seg(
        volume, seg, paths, segmentation_type=seg_type, transfer_syntax_uid=transfer_syntax,
        highdicom_frames=highdicom_frames, **EQUIPMENT,
    )
    ours, theirs = tmp_path / "ours.dcm", tmp_path / "theirs.dcm"
    write_part10(ds, ours)
    ds.save_as(theirs, enforce_file_format=True)
    assert ours.read_bytes() == theirs.read_bytes()
    read = pydicom.dcmread(ours)
    assert read.file_meta.TransferSyntaxUID == transfer_syntax
    assert read.pixel_array.any()


def test_write_part10_pads_odd_pixel_data_and_fills_file_meta(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "2.25.7"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 3, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = b"\x01\x02\x03"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ours, theirs = tmp_path / "ours.dcm", tmp_path / "theirs.dcm"
    write_part10(ds, ours)
    ds.save_as(theirs, enforce_file_format=True)
    assert ours.read_bytes() == theirs.read_bytes()
    read = pydicom.dcmread(ours)
    assert read.file_meta.MediaStorageSOPInstanceUID == "2.25.7"
    assert read.PixelData[:3] == b"\x01\x02\x03"


def _big_deflated(path: Path, pixel_mb: int = 48) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.91"
    ds.PatientName = "Test^Leading"
    ds.PatientID = "TN-LEAD-1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.92"
    ds.PixelData = bytes(pixel_mb * 1024 * 1024)
    ds["PixelData"].VR = "OB"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    write_part10(ds, path)
    return path


def test_read_leading_inflates_only_what_the_leading_elements_need(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A Deflated file's header without inflating its 48 MB of Pixel Data (pydicom's dcmread inflates it all)."""
    path = _big_deflated(tmp_path / "big.dcm")
    inflated: list[int] = []
    real = files.zlib.decompressobj

    class Counting:
        def __init__(self, *args) -> None:  # noqa: ANN002
            self._d = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self._d.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def flush(self) -> bytes:
            out = self._d.flush()
            inflated.append(len(out))
            return out

        @property
        def unconsumed_tail(self) -> bytes:
            return self._d.unconsumed_tail

    monkeypatch.setattr(files.zlib, "decompressobj", Counting)
    ds = files.read_leading(path, 0x00100020)
    assert ds.PatientID == "TN-LEAD-1" and str(ds.PatientName) == "Test^Leading"
    assert ds.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.91" and "StudyInstanceUID" not in ds
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert 0 < sum(inflated) <= 2 * files.INFLATE_STEP  # of 48 MB
    whole = files.read_leading(path, 0x7FE00010)  # everything before the Pixel Data, never the Pixel Data
    assert whole.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.92" and "PixelData" not in whole


def test_read_leading_of_a_native_file_and_of_a_damaged_one(tmp_path: Path) -> None:
    path = _big_deflated(tmp_path / "big.dcm", pixel_mb=1)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    native = tmp_path / "native.dcm"
    ds.save_as(native, enforce_file_format=True)
    head = files.read_leading(native, 0x00100020)
    assert head.PatientID == "TN-LEAD-1" and "PixelData" not in head
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(path.read_bytes()[:400])  # meta and the start of the deflated stream only
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever dcmread would raise for a cut file
        files.read_leading(damaged, 0x7FE00010)
