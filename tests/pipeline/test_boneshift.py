"""pipeline.boneshift and its use by pipeline.compare: scans without a femoral-head landmark aligned by
the 1-D registration of their model-free bone profiles.

The phantom's field of view is cut below the femoral heads (the femur reaches the top of the scan, as the
demonstration model does on the real hip CT), so no landmark is found on either side. The follow-ups are
the same images moved in patient z and cut to another length: the expected shift is the one applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from pipeline.boneshift import MIN_CORRELATION, BoneRegistration, register_bone_profiles
from pipeline.compare import anatomical_profiles, compare_studies
from pipeline.labels import LabelTable, load_label_table
from pipeline.measure import MeasurementSettings, load_measurement_settings, measure
from pipeline.profiles import BONE_HU
from pipeline.types import (
    AnatomicalProfiles,
    BoneProfile,
    Comparison,
    PatientInfo,
    Segmentation,
)
from tests.pipeline.test_compare import HEIGHT_M, Scan, _scan, _volume

SHIFT_MM = 37.0


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def settings() -> MeasurementSettings:
    return load_measurement_settings()


@pytest.fixture(scope="module")
def cut(table: LabelTable, settings: MeasurementSettings) -> Scan:
    """Femoral heads cut by the top of the field of view: no landmark on either side."""
    return _scan(table, settings, scan_seed=16, fov_top_mm=-85.0)


def _moved(scan: Scan, settings: MeasurementSettings, *, dz_mm: float, drop_bottom: int) -> Scan:
    """The same images in another field of view: the ``drop_bottom`` lowest slices removed, and every voxel
    ``dz_mm`` higher in patient z (another table position: ImagePositionPatient / affine translation)."""
    affine = scan.phantom.affine_lps.copy()
    assert affine[2, 0] > 0  # the phantom's slices ascend in z along axis 0
    affine[:3, 3] += affine[:3, 0] * drop_bottom
    affine[2, 3] += dz_mm
    sl = slice(drop_bottom, None)
    volume = _volume(np.ascontiguousarray(scan.volume.hu[sl]), affine)
    seg = Segmentation(
        np.ascontiguousarray(scan.segmentation.label_map[sl]), np.ascontiguousarray(scan.segmentation.side_map[sl]),
        scan.segmentation.labels, "phantom", "0", affine_lps=affine,
    )
    m = measure(volume, seg, PatientInfo(sex="F", height_m=HEIGHT_M), settings)
    return Scan(scan.phantom, volume, seg, m, anatomical_profiles(volume, seg))


def _compare(current: Any, prior: Any, current_profiles: AnatomicalProfiles | None = None,
             prior_profiles: AnatomicalProfiles | None = None) -> Comparison:
    return compare_studies(
        current.measurements, current_profiles or current.profiles, prior.measurements,
        prior_profiles or prior.profiles, current_study_date="20240301", prior_study_date="20231001",
        prior_study_uid="1.2.3.99", height_m=HEIGHT_M,
    )


# --------------------------------------------------------------------------- the bone profiles


def test_bone_profile_is_the_bone_window_area_per_side_in_absolute_z(cut: Scan) -> None:
    prof = cut.profiles
    assert prof.landmark_z_mm == {"right": None, "left": None}
    hu = cut.volume.hu
    left_cols = cut.phantom.side_of_columns()
    pixel_mm2 = abs(cut.phantom.affine_lps[0, 2] * cut.phantom.affine_lps[1, 1])
    z = cut.phantom.affine_lps[2, 3] + cut.phantom.affine_lps[2, 0] * np.arange(hu.shape[0])
    bone = (hu >= BONE_HU) & (hu <= 2000.0)
    for side, cols in (("right", ~left_cols), ("left", left_cols)):
        b = prof.bone[side]
        assert b is not None and b.slice_mm == pytest.approx(4.0)
        assert b.z_mm == pytest.approx(tuple(z))
        expected = bone[:, :, cols].sum(axis=(1, 2)) * pixel_mm2
        assert np.allclose(b.area_mm2, expected) and max(b.area_mm2) > 0
        assert not any(b.metal)
    # without a landmark, the structure profiles and the field of view are in absolute patient z
    assert prof.fov_z_mm["right"] == pytest.approx((z[0] - 2.0, z[-1] + 2.0))
    assert min(min(p.z_mm) for p in prof.profiles) >= z[0] - 1e-9


# --------------------------------------------------------------------------- (a) the same scan twice


def test_the_same_scan_twice_is_aligned_with_no_shift_and_no_change(cut: Scan) -> None:
    c = _compare(cut, cut)
    compared = [ch for ch in c.changes if ch.compared]
    assert len(compared) >= 30, [(ch.key, ch.side, ch.reason) for ch in c.changes if not ch.compared]
    for ch in compared:
        assert ch.change_ml == 0.0 and ch.change_ratio == 0.0, (ch.key, ch.side, ch.change_ml)
        assert "aligned by bone profile registration (correlation 1.00, shift +0.0 mm)" in ch.reason
    assert "bone profile registration" in c.landmark
    assert "aligned by bone profile registration (correlation 1.00, shift +0.0 mm)" in c.method


# --------------------------------------------------------------------------- (b) moved in z, other length


def test_a_follow_up_moved_37_mm_in_z_with_another_field_of_view_is_registered(
    cut: Scan, settings: MeasurementSettings
) -> None:
    follow = _moved(cut, settings, dz_mm=SHIFT_MM, drop_bottom=12)  # 48 mm shorter at the bottom
    for side in ("right", "left"):
        prior_bone, follow_bone = cut.profiles.bone[side], follow.profiles.bone[side]
        assert prior_bone is not None and follow_bone is not None
        reg = register_bone_profiles(prior_bone, follow_bone)
        assert reg.accepted and reg.correlation is not None and reg.correlation >= MIN_CORRELATION
        assert reg.shift_mm == pytest.approx(SHIFT_MM, abs=1.0), side
    c = _compare(follow, cut)
    compared = [ch for ch in c.changes if ch.compared]
    assert len(compared) >= 30
    for ch in compared:
        assert abs(ch.change_ratio) <= 0.005 and abs(ch.change_ml) <= 0.5, (ch.key, ch.side, ch.change_ml)
        assert "in the current scan's patient z, aligned by bone profile registration" in ch.reason
        assert ch.common_range_mm is not None
    # the common range is on the follow-up's axis: it stops at the follow-up's bottom, not the prior's
    lo = min(ch.common_range_mm[0] for ch in compared)  # type: ignore[index]
    assert lo == pytest.approx(follow.profiles.fov_z_mm["right"][0], abs=1e-6)  # type: ignore[index]
    assert "shift +37" in c.method or "shift +36" in c.method


def test_registration_with_other_slice_spacings_is_sub_slice() -> None:
    """A smooth profile sampled at 5 mm (prior) and 2 mm (current), shifted by 23.4 mm."""
    def curve(z: np.ndarray) -> np.ndarray:
        return 800.0 + 500.0 * np.exp(-(((z + 120.0) / 25.0) ** 2)) + 300.0 * np.sin(z / 31.0)

    zp = -300.0 + 5.0 * np.arange(60)
    zc = -250.0 + 2.0 * np.arange(110)
    shift = 23.4
    prior = BoneProfile(tuple(zp), tuple(curve(zp)), (False,) * zp.size, 5.0)
    current = BoneProfile(tuple(zc), tuple(curve(zc - shift)), (False,) * zc.size, 2.0)
    reg = register_bone_profiles(prior, current)
    assert reg.accepted and reg.shift_mm == pytest.approx(shift, abs=1.0)
    assert reg.describe().startswith("aligned by bone profile registration (correlation ")


# --------------------------------------------------------------------------- (c) registration fails


def test_a_flat_bone_profile_is_not_registered() -> None:
    z = tuple(-200.0 + 3.0 * np.arange(80))
    flat = BoneProfile(z, (500.0,) * len(z), (False,) * len(z), 3.0)
    reg = register_bone_profiles(flat, flat)
    assert not reg.accepted and reg.shift_mm is None and "flat" in reg.reason


def test_too_little_overlap_is_not_registered() -> None:
    z = -200.0 + 3.0 * np.arange(15)  # 45 mm of scan
    short = BoneProfile(tuple(z), tuple(np.sin(z / 7.0) * 100 + 500), (False,) * z.size, 3.0)
    reg = register_bone_profiles(short, short)
    assert not reg.accepted and "share at most 45 mm" in reg.reason and "needs >= 60 mm" in reg.reason


def test_uncorrelated_profiles_are_not_registered() -> None:
    rng = np.random.default_rng(3)
    z = tuple(-300.0 + 3.0 * np.arange(100))
    a = BoneProfile(z, tuple(rng.normal(500, 100, 100)), (False,) * 100, 3.0)
    b = BoneProfile(z, tuple(rng.normal(500, 100, 100)), (False,) * 100, 3.0)
    reg = register_bone_profiles(a, b)
    assert not reg.accepted and reg.correlation is not None and reg.correlation < MIN_CORRELATION
    assert "peak correlation" in reg.reason


def test_a_failed_registration_leaves_the_side_not_compared_with_its_reason(cut: Scan) -> None:
    flat = {
        side: dataclasses.replace(b, area_mm2=(100.0,) * len(b.z_mm)) for side, b in cut.profiles.bone.items()
        if b is not None
    }
    flat_profiles = dataclasses.replace(cut.profiles, bone=flat)
    c = _compare(cut, cut, current_profiles=flat_profiles)
    assert c.changes and not any(ch.compared for ch in c.changes)
    for ch in c.changes:
        assert ch.change_ml is None and "no landmark" in ch.reason
        assert "bone profile registration failed" in ch.reason and "flat" in ch.reason


# --------------------------------------------------------------------------- (d) profiles stored before


def _old_form(profiles: AnatomicalProfiles) -> AnatomicalProfiles:
    """What the node stored before bone profiles: no bone, and nothing for a side without a landmark."""
    no_lm = {side for side, z in profiles.landmark_z_mm.items() if z is None}
    return AnatomicalProfiles(
        landmark=profiles.landmark, landmark_z_mm=profiles.landmark_z_mm,
        fov_z_mm={s: (None if s in no_lm else r) for s, r in profiles.fov_z_mm.items()},
        profiles=tuple(p for p in profiles.profiles if p.side not in no_lm),
        metal_z_mm={s: (None if s in no_lm else r) for s, r in profiles.metal_z_mm.items()},
    )


def test_old_stored_profiles_compare_as_before(cut: Scan) -> None:
    old = _old_form(cut.profiles)
    assert old.bone == {} and old.landmark_reliable == {}
    c = _compare(cut, cut, prior_profiles=old)
    assert c.changes and not any(ch.compared for ch in c.changes)
    for ch in c.changes:
        assert ch.reason.startswith("no landmark: femoral head not in the prior scan's")
        assert "registration" not in ch.reason
    assert "registration" not in c.method and "registration" not in c.landmark


def test_sides_with_landmarks_stay_aligned_on_them(table: LabelTable, settings: MeasurementSettings) -> None:
    full = _scan(table, settings)
    c = _compare(full, full)
    assert all("from the landmark" in ch.reason for ch in c.changes if ch.compared)
    assert "registration" not in c.method and isinstance(register_bone_profiles, object)
    assert BoneRegistration(True, 1.0, 0.95, 80.0, "").describe() == (
        "aligned by bone profile registration (correlation 0.95, shift +1.0 mm)"
    )


def test_a_landmark_misplaced_by_metal_in_one_scan_only_is_replaced_by_the_registration(
    table: LabelTable, settings: MeasurementSettings
) -> None:
    """A follow-up with prostheses on both sides: its femoral-head landmark is unreliable (metal within 30 mm)
    and found 30 mm off; the prior's is good. Aligning on the misplaced landmark cut 30 mm off the common range
    (a trunk muscle at the top of the scan then showed -90 % on phantom pairs); the bone profiles (metal
    slices left out) place the scans as they are: no change."""
    from pipeline.alignment import on_axis

    full = _scan(table, settings)
    off = {side: -30.0 for side in ("right", "left")}
    misplaced = dataclasses.replace(
        on_axis(full.profiles, off),
        landmark_z_mm={s: (z + 30.0 if z is not None else None) for s, z in full.profiles.landmark_z_mm.items()},
        landmark_reliable={"right": False, "left": False},
    )
    c = _compare(full, full, current_profiles=misplaced)
    compared = [ch for ch in c.changes if ch.compared]
    assert len(compared) >= 30, [(ch.key, ch.side, ch.reason) for ch in c.changes if not ch.compared]
    for ch in compared:
        assert abs(ch.change_ratio) <= 0.005 and abs(ch.change_ml) <= 0.5, (ch.key, ch.side, ch.change_ml)
        assert "aligned by bone profile registration" in ch.reason
