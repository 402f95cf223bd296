"""pipeline.coverage: which body regions a series covers, and the field-of-view policy."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from modelkit.nifti import RAS_TO_LPS
from modelkit.phantom import PhantomParams, generate_phantom
from pipeline.coverage import (
    Coverage,
    CoveragePolicy,
    check_field_of_view,
    find_coverage,
    regions_from_segmentation,
)
from pipeline.errors import DeclinedError
from pipeline.labels import LabelTable, load_label_table
from pipeline.types import SIDE_LEFT, Segmentation, Volume
from pipeline.volume import load_volume
from tests.pipeline.test_bodypart import _synthetic, _volume

POLICY = CoveragePolicy()


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


def _phantom_volume(table: LabelTable, **params: object) -> Volume:
    phantom = generate_phantom(PhantomParams(seed=2, spacing_mm=(4.0, 3.0, 3.0), **params), table)  # type: ignore[arg-type]
    return Volume(phantom.hu, phantom.affine_lps, "", "1", "2", "3", ())


def _regions(coverage: Coverage) -> set[str]:
    return {r.region for r in coverage.regions}


@pytest.mark.parametrize("implant", [None, "left"])
def test_whole_phantom_shows_pelvis_hip_thigh_and_knee(table: LabelTable, implant: str | None) -> None:
    coverage = check_field_of_view(_phantom_volume(table, implant=implant), POLICY)
    assert _regions(coverage) >= {"pelvis", "hip", "thigh"}
    hip, thigh, pelvis = coverage.get("hip"), coverage.get("thigh"), coverage.get("pelvis")
    assert hip is not None and thigh is not None and pelvis is not None
    assert thigh.length_mm >= 150.0 and hip.length_mm >= 20.0
    # head to foot: the pelvis above the hip, the hip above the thigh (they meet at the trochanters)
    assert pelvis.z_mm[1] > hip.z_mm[1] > thigh.z_mm[1] and hip.z_mm[0] > thigh.z_mm[0]
    assert coverage.get("below_knee") is None


def test_hip_only_phantom_is_accepted_by_its_hip(table: LabelTable) -> None:
    coverage = check_field_of_view(_phantom_volume(table, fov_bottom_mm=-150.0, implant="right"), POLICY)
    hip = coverage.get("hip")
    assert hip is not None and hip.length_mm >= 20.0
    thigh = coverage.get("thigh")
    assert thigh is None or thigh.length_mm < 60.0  # a few slices of shaft at most
    with pytest.raises(DeclinedError, match=r"^no thigh in the field of view \(at least 60 mm of one is needed\): "
                                            r"regions seen: .*hip \("):
        check_field_of_view(_phantom_volume(table, fov_bottom_mm=-150.0), CoveragePolicy(("thigh",), 60.0))


def test_thigh_only_phantom_shows_no_hip(table: LabelTable) -> None:
    coverage = check_field_of_view(_phantom_volume(table, fov_top_mm=-250.0), POLICY)
    assert "thigh" in _regions(coverage) and not _regions(coverage) & {"hip", "pelvis"}


def _reoriented(volume: Volume, perm: tuple[int, int, int], flips: tuple[int, ...]) -> Volume:
    """The same image with its array axes permuted and flipped, the affine adjusted to match."""
    hu, affine = volume.hu, volume.affine_lps.copy()
    for axis in flips:
        hu = np.flip(hu, axis)
        affine[:3, 3] += affine[:3, axis] * (volume.hu.shape[axis] - 1)
        affine[:3, axis] *= -1
    hu = np.ascontiguousarray(np.transpose(hu, perm))
    out = np.eye(4)
    out[:3, :3] = affine[:3, list(perm)]
    out[:3, 3] = affine[:3, 3]
    return Volume(hu, out, "", "1", "2", "3", ())


@pytest.fixture(scope="module")
def hip_ct(shared_data: Path) -> Volume:
    img = nib.load(shared_data / "totalseg-hip-ct" / "example_ct.nii.gz")
    return Volume(np.asarray(img.dataobj, dtype=np.float32), RAS_TO_LPS @ img.affine, "", "1", "2", "3", ())


@pytest.mark.parametrize(
    ("perm", "flips"),
    [((0, 1, 2), ()), ((2, 1, 0), (2,)), ((1, 2, 0), (0, 1))],
    ids=["as-stored", "slices-first-reversed", "rotated-flipped"],
)
def test_real_hip_ct_shows_hip_and_pelvis_and_is_accepted(
    hip_ct: Volume, perm: tuple[int, int, int], flips: tuple[int, ...]
) -> None:
    """Pelvis to proximal femur, left hip prosthesis: the femoral heads (and the metal one) beside the pelvis."""
    coverage = check_field_of_view(_reoriented(hip_ct, perm, flips), POLICY)
    hip, pelvis = coverage.get("hip"), coverage.get("pelvis")
    assert hip is not None and hip.length_mm >= 45.0
    # the reference femur labels occupy z 94..148 mm; the acetabula reach higher
    assert hip.z_mm[0] <= 100.0 and 140.0 <= hip.z_mm[1] <= 200.0
    assert pelvis is not None and pelvis.z_mm[0] > 150.0
    assert coverage.get("thigh") is None and coverage.get("knee") is None
    assert coverage.to_record()["hip"] == [round(hip.z_mm[0], 1), round(hip.z_mm[1], 1)]


def test_tcia_abdomen_ct_is_declined_with_what_was_seen(shared_data: Path) -> None:
    volume = load_volume(sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm")))
    with pytest.raises(DeclinedError) as info:
        check_field_of_view(volume, POLICY)
    message = str(info.value)
    assert message.startswith("no hip or thigh in the field of view (at least 20 mm of one is needed): regions seen: ")
    assert "134 axial slices (z 86..485 mm)" in message and "femoral shaft pairs in 0" in message
    assert "\n" not in message
    assert info.value.study_uid == volume.study_instance_uid


def test_synthetic_lower_leg_shows_below_knee_only() -> None:
    # per side a tibia (15 x 13 mm) and a fibula (6 mm) 40 mm apart
    bones = [(-80.0, 0.0, 15.0, 13.0), (-120.0, 10.0, 6.0, 6.0), (80.0, 0.0, 15.0, 13.0), (120.0, 10.0, 6.0, 6.0)]
    coverage = find_coverage(_volume(_synthetic(30, (0, 30), bones)))
    assert _regions(coverage) == {"below_knee"}
    with pytest.raises(DeclinedError, match="regions seen: below_knee \\(120 mm\\)"):
        check_field_of_view(_volume(_synthetic(30, (0, 30), bones)), POLICY)


def test_policy_validation_names_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"accept_regions = \['abdomen'\]: a non-empty list of \['pelvis', 'hip'"):
        CoveragePolicy(("abdomen",))
    with pytest.raises(ValueError, match="min_region_mm = 0.0: a number of mm > 0"):
        CoveragePolicy(min_region_mm=0.0)
    assert POLICY.to_record() == {"accept_regions": ["hip", "thigh"], "min_region_mm": 20.0}


def test_regions_from_segmentation(table: LabelTable) -> None:
    shape = (20, 10, 10)
    labels = np.zeros(shape, np.uint8)
    labels[2:8] = table.by_key("gluteus_maximus").id  # inside the field of view
    labels[10:20] = table.by_key("vastus_lateralis").id  # reaches the last slice
    sides = np.where(labels > 0, SIDE_LEFT, 0).astype(np.uint8)
    seg = Segmentation(labels, sides, table, "unit", "0", affine_lps=np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]])
    assert regions_from_segmentation(seg, voxel_ml=0.1) == ("hip", "thigh (cut)")
    assert regions_from_segmentation(seg, voxel_ml=0.001) == ()  # 600 voxels of 1 mm³: under 10 mL
