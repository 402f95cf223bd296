"""write_part10 (dicomout.files) writes the file pydicom's save_as writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

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
