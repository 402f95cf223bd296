"""pipeline.compare: anatomical alignment and the common-range comparison with the prior study.

Phantom pairs of the same subject (same ``seed``, another ``scan_seed``) with atrophy,
shorter fields of view, other slice spacings and an implant; the expected changes come
from the phantoms' own ground truth (label counts), not from pipeline.compare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from pipeline.compare import (
    FLAG_PARTIAL_COMMON_RANGE,
    LANDMARK,
    METAL_WITHHOLD_NEAR_PCT,
    CompareError,
    anatomical_profiles,
    compare_groups,
    compare_studies,
    interval_days,
)
from pipeline.errors import PipelineError
from pipeline.labels import LabelTable, load_label_table
from pipeline.measure import MeasurementSettings, load_measurement_settings, measure
from modelkit.phantom import Phantom, PhantomParams, generate_phantom, ground_truth
from pipeline.types import (
    FLAG_METAL,
    AnatomicalProfiles,
    Comparison,
    Measurements,
    PatientInfo,
    Segmentation,
    StructureMeasurement,
    StructureProfile,
    Volume,
)

SEED = 5
HEIGHT_M = 1.65
BASE: dict[str, Any] = {"seed": SEED, "height_m": HEIGHT_M, "spacing_mm": (4.0, 3.0, 3.0)}
ATROPHY = {"vastus_lateralis:right": 0.8, "adductor_longus:right": 0.85, "gluteus_maximus:right": 0.9}


@dataclass(frozen=True)
class Scan:
    phantom: Phantom
    volume: Volume
    segmentation: Segmentation
    measurements: Measurements
    profiles: AnatomicalProfiles

    @property
    def truth(self) -> dict:
        return ground_truth(self.phantom, self.segmentation.labels)["structures"]


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def settings() -> MeasurementSettings:
    return load_measurement_settings()


def _volume(hu: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(
        hu=hu, affine_lps=affine, frame_of_reference_uid="1.2.3", study_instance_uid="1.2.3.1",
        series_instance_uid="1.2.3.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=(),
    )


def _sides(p: Phantom) -> np.ndarray:
    """Side map by the phantom's own rule: x > midline -> left (2), else right (1), on labelled voxels."""
    left = np.broadcast_to(p.side_of_columns()[None, None, :], p.labels.shape)
    return np.where(p.labels > 0, np.where(left, 2, 1), 0).astype(np.uint8)


def _scan(table: LabelTable, settings: MeasurementSettings, **params: Any) -> Scan:
    p = generate_phantom(PhantomParams(**{**BASE, **params}), table)
    volume = _volume(p.hu, p.affine_lps)
    seg = Segmentation(p.labels, _sides(p), table, "phantom", "0", affine_lps=p.affine_lps)
    m = measure(volume, seg, PatientInfo(sex="F", height_m=HEIGHT_M), settings)
    return Scan(p, volume, seg, m, anatomical_profiles(volume, seg))


def _compare(current: Scan, prior: Scan, **kwargs: Any) -> Comparison:
    args: dict[str, Any] = {
        "current_study_date": "20240301", "prior_study_date": "20231001",
        "prior_study_uid": "1.2.3.99", "height_m": HEIGHT_M,
    }
    args.update(kwargs)
    return compare_studies(current.measurements, current.profiles, prior.measurements, prior.profiles, **args)


def _truth_ratio(current: Scan, prior: Scan, key: str, side: str) -> float:
    """Whole-scan volume ratio - 1 from the phantoms' label counts."""
    return current.truth[key][side]["volume_ml"] / prior.truth[key][side]["volume_ml"] - 1.0


def _voxel_stats(scan: Scan, key: str, side: str) -> tuple[float, float]:
    """Mean HU and fat fraction (-190..-30 HU) of a structure on one side, from the phantom's arrays."""
    p = scan.phantom
    mask = p.labels == scan.segmentation.labels.by_key(key).id
    left = p.side_of_columns()
    mask[:, :, ~left if side == "left" else left] = False
    hu = p.hu[mask].astype(np.float64)
    return float(hu.mean()), float(((hu >= -190.0) & (hu <= -30.0)).mean())


def _muscles(table: LabelTable) -> list[str]:
    return [label.key for label in table.labels if not label.is_bone]


@pytest.fixture(scope="module")
def prior(table: LabelTable, settings: MeasurementSettings) -> Scan:
    return _scan(table, settings)


@pytest.fixture(scope="module")
def rescan(table: LabelTable, settings: MeasurementSettings) -> Scan:
    return _scan(table, settings, scan_seed=11)


@pytest.fixture(scope="module")
def atrophied(table: LabelTable, settings: MeasurementSettings) -> Scan:
    return _scan(table, settings, scan_seed=12, atrophy=ATROPHY)


@pytest.fixture(scope="module")
def short_fov(table: LabelTable, settings: MeasurementSettings) -> Scan:
    # bottom and top not on the prior's 4-mm slice grid: the slices are shifted by 1.5 mm
    return _scan(table, settings, scan_seed=13, fov_bottom_mm=-298.5, fov_top_mm=-10.3)


@pytest.fixture(scope="module")
def thin_slices(table: LabelTable, settings: MeasurementSettings) -> Scan:
    return _scan(table, settings, scan_seed=14, spacing_mm=(3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def implant(table: LabelTable, settings: MeasurementSettings) -> Scan:
    return _scan(table, settings, scan_seed=15, implant="right")


# --------------------------------------------------------------------------- profiles


def test_profiles_integrate_to_the_measurements(prior: Scan) -> None:
    """Over the whole scan, a profile holds the same voxels, volume and mass as measure() found."""
    lo, hi = prior.profiles.fov_z_mm["right"]  # type: ignore[misc]
    assert hi - lo == pytest.approx(prior.volume.hu.shape[0] * 4.0)
    for p in prior.profiles.profiles:
        m = prior.measurements.structure(p.key, p.side)
        assert m is not None
        assert sum(p.voxels) == m.voxel_count
        assert sum(p.area_mm2) * p.slice_mm / 1000.0 == pytest.approx(m.volume_ml, rel=1e-9)
        mass = sum(a * p.slice_mm * (1 + h / 1000.0) for a, h in zip(p.area_mm2, p.mean_hu)) / 1000.0
        assert mass == pytest.approx(m.mass_g, rel=1e-6)
        assert sum(p.fat_voxels) / sum(p.voxels) == pytest.approx(m.fat_fraction, rel=1e-9)
        assert list(p.z_mm) == sorted(p.z_mm)


def test_landmark_is_the_top_of_the_femoral_head(prior: Scan) -> None:
    p = prior.phantom
    femur = prior.segmentation.labels.by_key("femur").id
    z = p.affine_lps[2, 3] + p.affine_lps[2, 0] * np.arange(p.hu.shape[0])
    for side, code in (("right", 1), ("left", 2)):
        has_femur = ((p.labels == femur) & (prior.segmentation.side_map == code)).any(axis=(1, 2))
        top_slice = float(z[np.flatnonzero(has_femur).max()])
        lm = prior.profiles.landmark_z_mm[side]
        assert lm is not None and top_slice <= lm <= top_slice + 4.0
    assert prior.profiles.landmark == LANDMARK
    assert prior.profiles.metal_z_mm == {"right": None, "left": None}


def test_profiles_of_slices_stored_superior_to_inferior_are_the_same(prior: Scan, table: LabelTable) -> None:
    flipped_affine = prior.phantom.affine_lps.copy()
    n = prior.volume.hu.shape[0]
    flipped_affine[:3, 3] += flipped_affine[:3, 0] * (n - 1)
    flipped_affine[:3, 0] *= -1
    volume = _volume(prior.volume.hu[::-1].copy(), flipped_affine)
    seg = Segmentation(
        prior.segmentation.label_map[::-1].copy(), prior.segmentation.side_map[::-1].copy(), table, "phantom", "0",
        affine_lps=flipped_affine,
    )
    flipped = anatomical_profiles(volume, seg)
    assert flipped.landmark_z_mm == pytest.approx(prior.profiles.landmark_z_mm)
    assert flipped.fov_z_mm == prior.profiles.fov_z_mm
    assert len(flipped.profiles) == len(prior.profiles.profiles)
    for a, b in zip(flipped.profiles, prior.profiles.profiles):
        assert (a.key, a.side, a.z_mm, a.voxels, a.fat_voxels) == (b.key, b.side, b.z_mm, b.voxels, b.fat_voxels)
        assert a.mean_hu == pytest.approx(b.mean_hu)


def test_one_side_without_femur_falls_back_to_the_other_side(prior: Scan, table: LabelTable) -> None:
    femur = table.by_key("femur").id
    labels = np.array(prior.segmentation.label_map)
    labels[(labels == femur) & (prior.segmentation.side_map == 2)] = 0
    sides = np.where(labels > 0, prior.segmentation.side_map, 0).astype(np.uint8)
    seg = Segmentation(labels, sides, table, "phantom", "0", affine_lps=prior.phantom.affine_lps)
    profiles = anatomical_profiles(prior.volume, seg)
    assert profiles.landmark_z_mm["left"] == profiles.landmark_z_mm["right"] == prior.profiles.landmark_z_mm["right"]
    assert "left side taken from the right femoral head" in profiles.landmark


def test_shape_mismatch_is_a_pipeline_error(prior: Scan, table: LabelTable) -> None:
    small = np.zeros((2, 3, 4), np.uint8)
    seg = Segmentation(small, small, table, "phantom", "0")
    with pytest.raises(CompareError, match="differs from volume shape") as info:
        anatomical_profiles(prior.volume, seg)
    assert isinstance(info.value, PipelineError)


# --------------------------------------------------------------------------- (a) same patient, other noise


def test_rescan_without_atrophy_shows_no_change(prior: Scan, rescan: Scan, table: LabelTable) -> None:
    c = _compare(rescan, prior)
    compared = [ch for ch in c.changes if ch.compared]
    assert len(compared) >= 2 * len(_muscles(table)) - 4
    for ch in compared:
        assert ch.change_ratio is not None and abs(ch.change_ratio) < 0.01, (ch.key, ch.side, ch.change_ratio)
        if FLAG_PARTIAL_COMMON_RANGE not in ch.flags:  # whole structure in both: HU straight from the voxels
            hu_now, fat_now = _voxel_stats(rescan, ch.key, ch.side)
            hu_before, fat_before = _voxel_stats(prior, ch.key, ch.side)
            assert ch.change_mean_hu == pytest.approx(hu_now - hu_before, abs=1e-6)
            assert ch.change_fat_fraction == pytest.approx(fat_now - fat_before, abs=1e-9)
    assert c.operated_side == ""
    assert c.landmark == LANDMARK
    assert "common range" in c.method and "(right)" in c.method and "(left)" in c.method


# --------------------------------------------------------------------------- (b) atrophy on the right


def test_atrophy_on_the_right_matches_the_ground_truth(prior: Scan, atrophied: Scan, table: LabelTable) -> None:
    c = _compare(atrophied, prior)
    for key, fraction in ((k.split(":")[0], v) for k, v in ATROPHY.items()):
        ch = c.change(key, "right")
        assert ch is not None and ch.compared
        truth = _truth_ratio(atrophied, prior, key, "right")
        assert truth == pytest.approx(fraction - 1.0, abs=0.01)  # the phantom did what was asked
        assert ch.change_ratio == pytest.approx(truth, abs=0.02)
        assert ch.change_ml == pytest.approx(ch.current_volume_ml - ch.prior_volume_ml)  # type: ignore[operator]
        assert ch.change_ml < 0  # type: ignore[operator]
    for key in _muscles(table):
        for side in ("right", "left"):
            ch = c.change(key, side)
            if ch is None or not ch.compared:
                continue
            assert ch.change_ratio == pytest.approx(_truth_ratio(atrophied, prior, key, side), abs=0.02), (key, side)
            if side == "left":
                assert abs(ch.change_ratio) < 0.01, (key, ch.change_ratio)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- (c) shorter field of view


def test_shorter_follow_up_compares_only_the_common_range(prior: Scan, short_fov: Scan, table: LabelTable) -> None:
    c = _compare(short_fov, prior)
    cut = 0
    for ch in c.changes:
        if not ch.compared or ch.key not in _muscles(table):
            continue
        assert ch.common_range_mm is not None
        truth = _truth_ratio(short_fov, prior, ch.key, ch.side)
        if FLAG_PARTIAL_COMMON_RANGE in ch.flags:
            assert "common range" in ch.reason and f"{ch.common_range_mm[0]:.0f}" in ch.reason
            if truth < -0.10 and ch.prior_volume_ml > 50:  # type: ignore[operator]
                cut += 1  # the whole-scan volumes would show a false loss of more than 10 %
                assert abs(ch.change_ratio) < 0.025, (ch.key, ch.side, ch.change_ratio, truth)  # type: ignore[arg-type]
        else:
            # not cut by either scan: the common-range value is the whole structure
            assert ch.change_ratio == pytest.approx(truth, abs=0.005), (ch.key, ch.side)
    assert cut >= 16  # vasti, hamstrings, adductor magnus ... on both sides
    vl = c.change("vastus_lateralis", "right")
    assert vl is not None and FLAG_PARTIAL_COMMON_RANGE in vl.flags
    lo, hi = vl.common_range_mm  # type: ignore[misc]
    lm = prior.profiles.landmark_z_mm["right"]
    assert lo + lm == pytest.approx(-298.5 - 2.0, abs=1.5)  # type: ignore[operator]
    assert hi + lm == pytest.approx(-10.3, abs=4.0)  # type: ignore[operator]


def test_withhold_partial_withholds_every_structure_the_field_of_view_cuts_and_keeps_the_rest(
    prior: Scan, short_fov: Scan, table: LabelTable
) -> None:
    """[prior] withhold_partial (the node's default): a change over part of a structure only is not shown
    (phantom pairs: those changes were the wrong ones, README "Implants at follow-up"); whole ones are."""
    plain, ruled = _compare(short_fov, prior), _compare(short_fov, prior, withhold_partial=True)
    withheld = 0
    for ch, ch0 in zip(ruled.changes, plain.changes, strict=True):
        assert (ch.key, ch.side) == (ch0.key, ch0.side)
        if ch0.compared and FLAG_PARTIAL_COMMON_RANGE in ch0.flags:
            assert not ch.compared and ch.change_ml is None and ch.change_ratio is None
            assert FLAG_PARTIAL_COMMON_RANGE in ch.flags
            assert ch.reason.startswith("the field of view cuts it (common range ") and "change is not shown" in ch.reason
            assert f"{ch0.common_range_mm[0]:.0f}" in ch.reason  # type: ignore[index]  # the range it was compared over
            withheld += 1
        else:
            assert ch == ch0
    assert withheld >= 16 and any(ch.compared for ch in ruled.changes)


# --------------------------------------------------------------------------- (d) other slice spacing


def test_other_slice_spacing_without_atrophy_shows_no_change(prior: Scan, thin_slices: Scan, table: LabelTable) -> None:
    c = _compare(thin_slices, prior)
    for side in ("right", "left"):
        total_prior = total_current = 0.0
        for key in _muscles(table):
            ch = c.change(key, side)
            if ch is None or not ch.compared:
                continue
            if FLAG_PARTIAL_COMMON_RANGE not in ch.flags:
                assert ch.change_ratio == pytest.approx(_truth_ratio(thin_slices, prior, key, side), abs=0.005)
            if ch.prior_volume_ml > 100:  # type: ignore[operator]
                assert abs(ch.change_ratio) < 0.015, (key, side, ch.change_ratio)  # type: ignore[arg-type]
            total_prior += ch.prior_volume_ml  # type: ignore[operator]
            total_current += ch.current_volume_ml  # type: ignore[operator]
        assert total_current / total_prior - 1.0 == pytest.approx(0.0, abs=0.005)


# --------------------------------------------------------------------------- (e) implant


def test_implant_flags_metal_on_the_operated_side_only(prior: Scan, implant: Scan, table: LabelTable) -> None:
    c = _compare(implant, prior)
    assert c.operated_side == "right"
    assert implant.profiles.metal_z_mm["right"] is not None and implant.profiles.metal_z_mm["left"] is None
    assert "right side taken from the left femoral head" in implant.profiles.landmark
    near = [k for k in implant.phantom.metal_structures if k in _muscles(table)]
    assert near
    kept = _compare(implant, prior, metal_withhold_near_pct=None, metal_withhold_slices_pct=None)  # volume kept
    withheld = 0
    for key in near:
        ch = kept.change(key, "right")
        assert ch is not None and ch.compared and FLAG_METAL in ch.flags, key
        assert ch.change_mean_hu is None and ch.change_fat_fraction is None and ch.change_mass_g is None
        assert ch.current_mean_hu is None and ch.prior_mass_g is None
        assert ch.change_ml is not None and "metal" in ch.reason
        # with it (the default threshold): shown with the same values, or withheld with the share near metal
        ch = c.change(key, "right")
        assert ch is not None and FLAG_METAL in ch.flags, key
        m = implant.measurements.structure(key, "right")
        assert m is not None
        share = 100.0 * m.near_metal_voxels / m.voxel_count
        if ch.compared:
            assert share < METAL_WITHHOLD_NEAR_PCT and ch.change_ml == kept.change(key, "right").change_ml  # type: ignore[union-attr]
        else:
            withheld += 1
            assert ch.change_ml is None and "cannot be trusted" in ch.reason
            assert share >= METAL_WITHHOLD_NEAR_PCT or "slices with metal" in ch.reason
    assert withheld  # the muscles around a total hip
    for key in _muscles(table):
        ch = c.change(key, "left")
        if ch is None or not ch.compared:
            continue
        assert FLAG_METAL not in ch.flags, key
        assert ch.change_mean_hu is not None and ch.change_mass_g is not None
        assert abs(ch.change_ratio) < 0.01, (key, ch.change_ratio)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- (f) no landmark


def test_femoral_head_cut_means_no_comparison_without_bone_profiles(
    prior: Scan, table: LabelTable, settings: MeasurementSettings
) -> None:
    """Without the bone-profile registration (profiles stored before it: no bone profiles, nothing kept for a
    side without a landmark) a scan with the femoral heads cut is not compared. (With bone profiles it is
    registered instead: tests/pipeline/test_boneshift.py.)"""
    cut = _scan(table, settings, scan_seed=16, fov_top_mm=-85.0)
    assert cut.profiles.landmark_z_mm == {"right": None, "left": None}
    assert cut.profiles.fov_z_mm["right"] is not None  # absolute patient z, for the registration
    registered = _compare(cut, prior)
    assert any(ch.compared for ch in registered.changes) and "bone profile registration" in registered.method
    cut = dataclasses.replace(cut, profiles=AnatomicalProfiles(
        landmark=cut.profiles.landmark, landmark_z_mm=cut.profiles.landmark_z_mm,
        fov_z_mm={"right": None, "left": None}, profiles=(), metal_z_mm={"right": None, "left": None},
    ))
    c = _compare(cut, prior)
    assert c.changes
    for ch in c.changes:
        assert not ch.compared and ch.change_ml is None and ch.change_ratio is None
        assert "no landmark" in ch.reason and "current" in ch.reason and "prior" not in ch.reason
    back = compare_studies(
        prior.measurements, prior.profiles, cut.measurements, cut.profiles, current_study_date="20240301",
        prior_study_date="20231001", prior_study_uid="1.2", height_m=HEIGHT_M,
    )
    assert all(not ch.compared and "femoral head not in the prior scan's field of view" in ch.reason for ch in back.changes)


# --------------------------------------------------------------------------- (g) dates, height, integration


def test_interval_and_change_per_height_squared(prior: Scan, atrophied: Scan) -> None:
    assert interval_days("20240301", "20231001") == 152
    assert interval_days("", "20231001") is None
    assert interval_days("20241301", "20231001") is None
    c = _compare(atrophied, prior)
    assert c.interval_days == 152 and c.height_m == HEIGHT_M and c.prior_study_uid == "1.2.3.99"
    ch = c.change("vastus_lateralis", "right")
    assert ch is not None and ch.change_ml is not None
    assert ch.change_per_height2_cm3_m2 == pytest.approx(ch.change_ml / HEIGHT_M**2)
    assert ch.change_mass_g == pytest.approx(ch.current_mass_g - ch.prior_mass_g)  # type: ignore[operator]
    c2 = compare_studies(
        dataclasses.replace(atrophied.measurements, height_m=None), atrophied.profiles,
        dataclasses.replace(prior.measurements, height_m=None), prior.profiles, current_study_date="2024-03-01",
        prior_study_date="20231001", prior_study_uid="1.2", height_m=None,
    )
    assert c2.interval_days is None and c2.height_m is None
    assert all(ch.change_per_height2_cm3_m2 is None for ch in c2.changes)


def _profile(key: str, z: np.ndarray, slice_mm: float, area: float = 100.0, hu: float = 50.0) -> StructureProfile:
    n = int(area / 10.0)  # 10 mm² pixels
    return StructureProfile(
        key=key, side="right", z_mm=tuple(float(v) for v in z), area_mm2=(area,) * len(z), mean_hu=(hu,) * len(z),
        voxels=(n,) * len(z), fat_voxels=(0,) * len(z), slice_mm=slice_mm,
    )


def _measurements(keys: list[str], table: LabelTable) -> Measurements:
    structures = tuple(
        StructureMeasurement(table.by_key(k).id, k, table.by_key(k).name, table.by_key(k).group, "right",
                             1, 1.0, 0.0, 0.0, 1.0, 0.0)
        for k in keys
    )
    return Measurements(structures, (), (), None, "", "F", "")


def test_partial_slices_integrate_the_same_anatomy_at_any_spacing(table: LabelTable) -> None:
    """A constant 100 mm² cross-section: volume = 100 mm² x the length inside the common range, exactly."""
    # prior: 4-mm slices covering -200..+40 mm; current: 3-mm slices covering -151..+50 mm
    z4 = -198.0 + 4.0 * np.arange(60)
    z3 = -149.5 + 3.0 * np.arange(67)
    prior = AnatomicalProfiles(
        LANDMARK, {"right": -70.0, "left": None}, {"right": (-200.0, 40.0), "left": None},
        (_profile("vastus_lateralis", z4, 4.0), _profile("sartorius", z4[z4 < -170], 4.0)),
        {"right": None, "left": None},
    )
    current = AnatomicalProfiles(
        LANDMARK, {"right": -72.0, "left": None}, {"right": (-151.0, 50.0), "left": None},
        (_profile("vastus_lateralis", z3, 3.0, hu=40.0),),
        {"right": None, "left": None},
    )
    keys = ["vastus_lateralis", "sartorius"]
    c = compare_studies(
        _measurements(keys, table), current, _measurements(keys, table), prior, current_study_date="20240102",
        prior_study_date="20240101", prior_study_uid="1.2", height_m=1.6,
    )
    vl = c.change("vastus_lateralis", "right")
    assert vl is not None and vl.compared and vl.common_range_mm == (-151.0, 40.0)
    assert vl.prior_volume_ml == pytest.approx(100.0 * 191.0 / 1000.0)
    assert vl.current_volume_ml == pytest.approx(100.0 * 191.0 / 1000.0)
    assert vl.change_ratio == pytest.approx(0.0, abs=1e-12)
    assert FLAG_PARTIAL_COMMON_RANGE in vl.flags  # both scans extend beyond the common range
    assert vl.change_mean_hu == pytest.approx(-10.0)
    assert vl.prior_mass_g == pytest.approx(100.0 * 191.0 * 1.05 / 1000.0)
    sa = c.change("sartorius", "right")
    assert sa is not None and not sa.compared and "not present in the common range" in sa.reason
    assert "current" in sa.reason and sa.change_ml is None
    assert c.change("vastus_lateralis", "left") is None  # in neither scan on the left
    assert "-151..40 mm (right)" in c.method and "nothing on the left (no landmark" in c.method


# --------------------------------------------------------------------------- muscle groups


@pytest.fixture(scope="module")
def hip_ct(table: LabelTable, settings: MeasurementSettings) -> Scan:
    """A hip CT of the same patient: the thigh muscles are cut, only the gluteal group is reported."""
    return _scan(table, settings, scan_seed=14, fov_bottom_mm=-250.0)


def test_groups_reported_in_both_studies_are_compared(prior: Scan, atrophied: Scan) -> None:
    c = _compare(atrophied, prior)
    groups = compare_groups(atrophied.measurements, prior.measurements, c)
    assert {(g.group, g.side) for g in groups} == {(g.group, g.side) for g in atrophied.measurements.groups}
    for g in groups:
        assert g.compared, (g.group, g.side, g.reason)
        sides = ("right", "left") if g.side == "both" else (g.side,)
        members = [ch for k in g.structure_keys for s in sides if (ch := c.change(k, s)) is not None]
        assert g.change_ml == pytest.approx(sum(ch.change_ml for ch in members))  # type: ignore[misc]
    glut_right = next(g for g in groups if g.group == "gluteal" and g.side == "right")
    glut_left = next(g for g in groups if g.group == "gluteal" and g.side == "left")
    assert glut_right.change_ml < 0 and abs(glut_left.change_ratio) < 0.02  # type: ignore[operator,arg-type]


def test_group_withheld_in_one_study_has_no_group_change(prior: Scan, hip_ct: Scan) -> None:
    for current, old, where in ((hip_ct, prior, "current"), (prior, hip_ct, "prior")):
        c = _compare(current, old)
        groups = {(g.group, g.side): g for g in compare_groups(current.measurements, old.measurements, c)}
        for side in ("right", "left", "both"):
            for name in ("above_knee", "all"):
                g = groups[(name, side)]
                assert not g.compared and g.change_ml is None and g.current_volume_ml is None
                assert g.reason.startswith("not compared: not reported: ") and g.reason.endswith(f"in the {where} study")
                assert "cut at the inferior edge of the field of view" in g.reason
            glut = groups[("gluteal", side)]
            assert glut.compared and glut.change_ml is not None and abs(glut.change_ratio) < 0.02  # type: ignore[arg-type]
        # structures keep today's rules: the vasti are compared over the common range
        vl = c.change("vastus_lateralis", "right")
        assert vl is not None and vl.compared and FLAG_PARTIAL_COMMON_RANGE in vl.flags


# --------------------------------------------------------------------------- metal: volume change withheld


def _sided_profile(key: str, side: str, area: float, z: np.ndarray) -> StructureProfile:
    n = int(area / 10.0)
    return StructureProfile(key=key, side=side, z_mm=tuple(float(v) for v in z), area_mm2=(area,) * len(z),
                            mean_hu=(50.0,) * len(z), voxels=(n,) * len(z), fat_voxels=(0,) * len(z), slice_mm=4.0)


def _metal_study(table: LabelTable, near: dict[tuple[str, str], int], areas: dict[tuple[str, str], float],
                 metal_right: bool) -> tuple[Measurements, AnatomicalProfiles]:
    """Structures with 1000 voxels each, ``near[(key, side)]`` of them within 15 mm of metal (flag metal)."""
    z = -198.0 + 4.0 * np.arange(50)  # -200..0 mm from the landmark
    structures = []
    for key, side in areas:
        n_near = near.get((key, side), 0)
        structures.append(StructureMeasurement(
            table.by_key(key).id, key, table.by_key(key).name, table.by_key(key).group, side, 1000, 10.0,
            50.0, 10.0, 10.5, 0.0, flags=(FLAG_METAL,) if n_near else (), near_metal_voxels=n_near,
        ))
    profiles = AnatomicalProfiles(
        LANDMARK, {"right": 0.0, "left": 0.0}, {"right": (-200.0, 0.0), "left": (-200.0, 0.0)},
        tuple(_sided_profile(key, side, area, z) for (key, side), area in areas.items()),
        {"right": (-120.0, 10.0) if metal_right else None, "left": None},
    )
    return Measurements(tuple(structures), (), (), None, "", "F", ""), profiles


METAL_KEYS = [("gluteus_medius", "right"), ("gluteus_minimus", "right"), ("gluteus_medius", "left"),
              ("vastus_medialis", "right"), ("vastus_medialis", "left")]


def _metal_comparison(table: LabelTable, near: dict[tuple[str, str], int], **kwargs: Any) -> Comparison:
    prior_m, prior_p = _metal_study(table, {}, {k: 100.0 for k in METAL_KEYS}, metal_right=False)
    cur_areas = {k: 100.0 for k in METAL_KEYS}
    cur_areas[("gluteus_medius", "right")] = 40.0  # the model's false loss near the implant
    cur_areas[("vastus_medialis", "right")] = 80.0  # real atrophy, far from metal
    cur_m, cur_p = _metal_study(table, near, cur_areas, metal_right=True)
    kwargs.setdefault("metal_withhold_slices_pct", None)  # the near-metal test alone (slices: below)
    return compare_studies(cur_m, cur_p, prior_m, prior_p, current_study_date="20240301",
                           prior_study_date="20231001", prior_study_uid="1.2.3.98", height_m=1.6, **kwargs)


def test_metal_near_a_large_share_of_a_structure_withholds_its_volume_change(table: LabelTable) -> None:
    near = {("gluteus_medius", "right"): 230, ("gluteus_minimus", "right"): 99}
    c = _metal_comparison(table, near, metal_withhold_near_pct=10.0)
    gmed = c.change("gluteus_medius", "right")
    assert gmed is not None and not gmed.compared and FLAG_METAL in gmed.flags
    assert gmed.change_ml is None and gmed.change_ratio is None and gmed.change_per_height2_cm3_m2 is None
    assert gmed.prior_volume_ml is None and gmed.current_volume_ml is None
    assert "metal within 15 mm of 23 % of its voxels in the current scan" in gmed.reason
    assert "cannot be trusted and the change is not shown" in gmed.reason
    # just below the threshold (9.9 %): shown, flagged metal, HU-based values withheld
    gmin = c.change("gluteus_minimus", "right")
    assert gmin is not None and gmin.compared and FLAG_METAL in gmin.flags
    assert gmin.change_ratio == pytest.approx(0.0) and gmin.change_mean_hu is None
    # the other side of the metal: shown
    left = c.change("gluteus_medius", "left")
    assert left is not None and left.compared and left.change_ratio == pytest.approx(0.0) and not left.flags
    # real atrophy far from metal: shown as its number
    vm = c.change("vastus_medialis", "right")
    assert vm is not None and vm.compared and vm.change_ratio == pytest.approx(-0.2)


def test_metal_withholding_threshold_and_rule_off(table: LabelTable) -> None:
    near = {("gluteus_medius", "right"): 230, ("gluteus_minimus", "right"): 99}
    low = _metal_comparison(table, near, metal_withhold_near_pct=9.9)
    gmin = low.change("gluteus_minimus", "right")
    assert gmin is not None and not gmin.compared and "10 % of its voxels" in gmin.reason  # 9.9 % >= 9.9 %
    off = _metal_comparison(table, near, metal_withhold_near_pct=None)
    gmed = off.change("gluteus_medius", "right")
    assert gmed is not None and gmed.compared and gmed.change_ratio == pytest.approx(-0.6)
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(CompareError, match="metal_withhold_near_pct"):
            _metal_comparison(table, near, metal_withhold_near_pct=bad)
        with pytest.raises(CompareError, match="metal_withhold_slices_pct"):
            _metal_comparison(table, near, metal_withhold_slices_pct=bad)


def test_metal_withheld_in_the_prior_scan_too(table: LabelTable) -> None:
    """Metal in the prior (an earlier implant): its share there withholds the change as well."""
    prior_m, prior_p = _metal_study(table, {("gluteus_medius", "right"): 500}, {k: 100.0 for k in METAL_KEYS},
                                    metal_right=True)
    cur_m, cur_p = _metal_study(table, {}, {k: 100.0 for k in METAL_KEYS}, metal_right=False)
    c = compare_studies(cur_m, cur_p, prior_m, prior_p, current_study_date="20240301",
                        prior_study_date="20231001", prior_study_uid="1.2", height_m=1.6, metal_withhold_near_pct=20.0,
                        metal_withhold_slices_pct=None)
    ch = c.change("gluteus_medius", "right")
    assert ch is not None and not ch.compared and "50 % of its voxels in the prior scan" in ch.reason


def test_group_with_a_member_withheld_near_metal_is_not_compared(table: LabelTable) -> None:
    from pipeline.types import GroupMeasurement

    c = _metal_comparison(table, {("gluteus_medius", "right"): 230}, metal_withhold_near_pct=10.0)
    group = GroupMeasurement("gluteal", "right", ("gluteus_medius", "gluteus_minimus"), 20.0, 21.0, None, None, False)
    cur_m, _ = _metal_study(table, {}, {k: 100.0 for k in METAL_KEYS}, metal_right=True)
    groups = compare_groups(dataclasses.replace(cur_m, groups=(group,)), dataclasses.replace(cur_m, groups=(group,)), c)
    assert len(groups) == 1 and not groups[0].compared and groups[0].change_ml is None
    assert "gluteus medius right" in groups[0].reason.lower() and "cannot be trusted" in groups[0].reason


def test_metal_in_the_slices_of_a_structure_withholds_its_change_on_both_sides(table: LabelTable) -> None:
    """Streaks cross the slice: a structure with a large share of its voxels in slices holding metal is
    withheld on either side; one below the metal is shown, its real atrophy as its number."""
    z_hip = -98.0 + 4.0 * np.arange(25)  # -100..0 mm: the hip, metal in -120..10 on the right
    z_thigh = -298.0 + 4.0 * np.arange(40)  # -300..-140 mm: below the metal
    z_mixed = -198.0 + 4.0 * np.arange(25)  # -200..-100 mm: 5 of 25 slices (20 %) in the metal's
    keys = {("gluteus_medius", "right"): z_hip, ("gluteus_medius", "left"): z_hip,
            ("vastus_medialis", "right"): z_thigh, ("adductor_longus", "left"): z_mixed}

    def study(area: dict, metal: bool) -> tuple[Measurements, AnatomicalProfiles]:
        m, _ = _metal_study(table, {}, {k: 100.0 for k in keys}, metal_right=metal)
        profiles = AnatomicalProfiles(
            LANDMARK, {"right": 0.0, "left": 0.0}, {"right": (-300.0, 0.0), "left": (-300.0, 0.0)},
            tuple(_sided_profile(k, s, area.get((k, s), 100.0), z) for (k, s), z in keys.items()),
            {"right": (-120.0, 10.0) if metal else None, "left": None},
        )
        return m, profiles

    prior_m, prior_p = study({}, metal=False)
    cur_m, cur_p = study({("vastus_medialis", "right"): 80.0}, metal=True)

    def compare(slices_pct: float | None) -> Comparison:
        return compare_studies(cur_m, cur_p, prior_m, prior_p, current_study_date="20240301",
                               prior_study_date="20231001", prior_study_uid="1.2", height_m=1.6,
                               metal_withhold_near_pct=None, metal_withhold_slices_pct=slices_pct)

    c = compare(25.0)
    for side in ("right", "left"):
        ch = c.change("gluteus_medius", side)
        assert ch is not None and not ch.compared and ch.change_ml is None and FLAG_METAL in ch.flags, side
        assert "100 % of its voxels (as the current scan shows it) lie in slices with metal in the current scan" in ch.reason
    vm = c.change("vastus_medialis", "right")
    assert vm is not None and vm.compared and vm.change_ratio == pytest.approx(-0.2)
    al = c.change("adductor_longus", "left")  # 20 %: below 25 %, shown
    assert al is not None and al.compared and al.change_ratio == pytest.approx(0.0)
    al = compare(20.0).change("adductor_longus", "left")
    assert al is not None and not al.compared and "20 % of its voxels (as the current scan shows it)" in al.reason
    off = compare(None).change("gluteus_medius", "left")
    assert off is not None and off.compared
    # the model lost the adductor in the streaks of the follow-up: the prior still shows 20 % of it there
    lost = AnatomicalProfiles(cur_p.landmark, cur_p.landmark_z_mm, cur_p.fov_z_mm, tuple(
        dataclasses.replace(p, z_mm=p.z_mm[:20], area_mm2=p.area_mm2[:20], mean_hu=p.mean_hu[:20],
                            voxels=p.voxels[:20], fat_voxels=p.fat_voxels[:20]) if p.key == "adductor_longus" else p
        for p in cur_p.profiles), cur_p.metal_z_mm)
    c = compare_studies(cur_m, lost, prior_m, prior_p, current_study_date="20240301", prior_study_date="20231001",
                        prior_study_uid="1.2", height_m=1.6, metal_withhold_near_pct=None, metal_withhold_slices_pct=20.0)
    al = c.change("adductor_longus", "left")
    assert al is not None and not al.compared
    assert "20 % of its voxels (as the prior scan shows it) lie in slices with metal in the current scan" in al.reason
