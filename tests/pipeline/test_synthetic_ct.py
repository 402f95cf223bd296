"""The synthetic CT writer other suites rely on: valid CT Image Storage, deterministic, exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.support.dciodvfy import dciodvfy_errors
from tests.support.synthetic_ct import (
    COMPRESSED_TRANSFER_SYNTAXES,
    slice_positions,
    write_ct_series,
    write_localizer,
)


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, *COMPRESSED_TRANSFER_SYNTAXES], ids=lambda u: u.name
)
def test_series_is_valid_ct_image_storage(tmp_path: Path, ts: str) -> None:
    paths = write_ct_series(tmp_path, n_slices=3, rows=32, cols=32, transfer_syntax=ts)
    assert len(paths) == 3
    ds = pydicom.dcmread(paths[1])
    assert ds.file_meta.TransferSyntaxUID == ts
    assert dciodvfy_errors(paths[1]) == []
    for kw in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientSize", "StudyDate", "StudyTime",
        "AccessionNumber", "Manufacturer", "KVP", "ConvolutionKernel", "SliceThickness", "ImagePositionPatient",
        "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID", "PatientPosition",
    ):
        assert kw in ds, kw
    assert (ds.BitsAllocated, ds.PixelRepresentation, ds.Rows, ds.Columns) == (16, 1, 32, 32)


def test_localizer_is_valid(tmp_path: Path) -> None:
    path = write_localizer(tmp_path)
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert dciodvfy_errors(path) == []


def test_deterministic(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", n_slices=3, rows=8, cols=8)
    b = write_ct_series(tmp_path / "b", n_slices=3, rows=8, cols=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = write_ct_series(tmp_path / "c", n_slices=3, rows=8, cols=8, series_number=2)
    da, dc = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert da.StudyInstanceUID == dc.StudyInstanceUID
    assert da.FrameOfReferenceUID == dc.FrameOfReferenceUID
    assert da.SeriesInstanceUID != dc.SeriesInstanceUID
    assert da.SOPInstanceUID != dc.SOPInstanceUID


def test_hu_function_of_lps_and_positions(tmp_path: Path) -> None:
    paths = write_ct_series(
        tmp_path, n_slices=4, rows=8, cols=10, origin=(10.0, -20.0, 30.0), slice_spacing=2.5,
        hu=lambda x, y, z: np.round(x) + 10 * np.round(z), reverse_file_order=True, instance_number_descending=True,
    )
    positions = slice_positions(4, slice_spacing=2.5, origin=(10.0, -20.0, 30.0))
    for p in paths:
        ds = pydicom.dcmread(p)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(positions - ipp, axis=1)))
        np.testing.assert_allclose(ipp, positions[k])
        assert int(ds.InstanceNumber) == 4 - k
        assert p.name == f"CT{3 - k:04d}.dcm"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        x = ipp[0] + np.arange(10) * 0.8
        np.testing.assert_array_equal(hu[0], np.round(x) + 10 * np.round(ipp[2]))


def test_gantry_tilt_geometry(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=3, rows=8, cols=8, gantry_tilt=18.5)
    ds0, ds2 = (pydicom.dcmread(p) for p in (paths[0], paths[2]))
    np.testing.assert_allclose(
        [float(v) for v in ds0.ImageOrientationPatient], [1, 0, 0, 0, np.cos(np.radians(18.5)), -np.sin(np.radians(18.5))]
    )
    step = np.asarray([float(v) for v in ds2.ImagePositionPatient]) - [float(v) for v in ds0.ImagePositionPatient]
    np.testing.assert_allclose(step, [0, 0, 4.0], atol=1e-9)  # along the table, not the tilted normal
    assert float(ds0.GantryDetectorTilt) == 18.5
