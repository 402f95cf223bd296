"""The real hip CT (TotalSegmentator example: pelvis to proximal femur, left hip prosthesis) as DICOM series in
several encodings and orientations: selection and loading give the same HU volume in patient space, and the
field-of-view policy accepts it by its hips with the same extents whatever the encoding or orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

from pipeline.coverage import CoveragePolicy, check_field_of_view
from pipeline.selection import select_series
from pipeline.types import Volume
from pipeline.volume import load_volume
from tests.support.niftict import write_nifti_ct_as_dicom

STUDY = "1.2.826.0.1.3680043.8.498.66201"
VARIANTS = {
    "explicit": dict(transfer_syntax=ExplicitVRLittleEndian),
    "implicit-reversed": dict(transfer_syntax=ImplicitVRLittleEndian, reverse_slices=True),
    "rle-transposed": dict(transfer_syntax=RLELossless, transpose_in_plane=True),
    "jpegls-reversed-transposed": dict(reverse_slices=True, transpose_in_plane=True),  # re-encoded below
}


def _series(tmp_path: Path, shared_data: Path, name: str) -> list[Path]:
    options = dict(VARIANTS[name])
    files = write_nifti_ct_as_dicom(
        shared_data / "totalseg-hip-ct" / "example_ct.nii.gz", tmp_path / name, study_uid=STUDY,
        patient_id="TN-HIP-2", height_m=1.75, **options,
    )
    if name.startswith("jpegls"):
        for path in files:
            ds = pydicom.dcmread(path)
            ds.compress(JPEGLSLossless)
            ds.save_as(path, enforce_file_format=True)
    return files


def _load(files: list[Path]) -> Volume:
    selected = select_series({str(STUDY) + ".1": files}, study_instance_uid=STUDY)
    return load_volume(selected.paths, headers=selected.headers)


def _world_bounds(volume: Volume) -> np.ndarray:
    corners = np.array([[i, j, k, 1.0] for i in (0, volume.shape[0] - 1) for j in (0, volume.shape[1] - 1)
                        for k in (0, volume.shape[2] - 1)])
    world = (volume.affine_lps @ corners.T)[:3]
    return np.stack([world.min(axis=1), world.max(axis=1)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Volume:
    return _load(_series(tmp_path_factory.mktemp("hip"), shared_data, "explicit"))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_encoding_and_orientation_loads_the_same_anatomy_and_is_accepted_by_its_hips(
    name: str, reference: Volume, tmp_path: Path, shared_data: Path
) -> None:
    files = _series(tmp_path, shared_data, name)
    if name.startswith("jpegls"):
        assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless
    volume = _load(files)
    assert sorted(volume.shape) == sorted(reference.shape)
    np.testing.assert_allclose(_world_bounds(volume), _world_bounds(reference), atol=1e-3)
    assert float(volume.hu.sum(dtype=np.float64)) == pytest.approx(float(reference.hu.sum(dtype=np.float64)))
    coverage = check_field_of_view(volume, CoveragePolicy())
    ref_coverage = check_field_of_view(reference, CoveragePolicy())
    regions = {r.region: r.z_mm for r in coverage.regions}
    assert set(regions) == {r.region for r in ref_coverage.regions} and "hip" in regions and "thigh" not in regions
    for r in ref_coverage.regions:
        np.testing.assert_allclose(regions[r.region], r.z_mm, atol=3.0)  # one 3 mm slice at most
