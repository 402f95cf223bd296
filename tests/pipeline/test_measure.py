"""pipeline.measure: exact volumes, HU, mass, groups, SMI, sarcopenia and quality flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.labels import LabelTable, load_label_table
from pipeline.measure import (
    DEFAULT_MEASUREMENT_PATH,
    DENSITY_FORMULA,
    MeasurementSettings,
    MeasurementSettingsError,
    load_measurement_settings,
    measure,
)
from modelkit.phantom import Phantom, PhantomParams, generate_phantom
from pipeline.groups import GroupThreshold
from pipeline.types import (
    FLAG_EMPTY,
    FLAG_IMPLAUSIBLE_VOLUME,
    FLAG_METAL,
    FLAG_NO_HEIGHT,
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    SIDE_LEFT,
    SIDE_RIGHT,
    Measurements,
    PatientInfo,
    Segmentation,
    Volume,
)


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def settings() -> MeasurementSettings:
    return load_measurement_settings()


def _affine(spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), z_sign: float = 1.0) -> np.ndarray:
    """Axial, head-first: k -> z (superior when z_sign > 0), r -> y, c -> x."""
    dz, dy, dx = spacing
    return np.array([[0, 0, dx, -50.0], [0, dy, 0, -50.0], [z_sign * dz, 0, 0, 100.0], [0, 0, 0, 1.0]])


def _run(
    hu: np.ndarray,
    labels: np.ndarray,
    sides: np.ndarray,
    table: LabelTable,
    settings: MeasurementSettings,
    affine: np.ndarray | None = None,
    patient: PatientInfo | None = None,
    **kwargs: object,
) -> Measurements:
    affine = _affine() if affine is None else affine
    volume = Volume(hu.astype(np.float32), affine, "1.2.3", "1.2.3.4", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.2", ())
    seg = Segmentation(labels.astype(np.uint8), sides.astype(np.uint8), table, "test", "0", affine_lps=affine)
    return measure(volume, seg, patient if patient is not None else PatientInfo(sex="F"), settings, **kwargs)  # type: ignore[arg-type]


def _blank(shape: tuple[int, int, int] = (10, 12, 14)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full(shape, -1000.0, dtype=np.float32), np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)


def _codes(m: Measurements, key: str, side: str) -> tuple[str, ...]:
    s = m.structure(key, side)
    assert s is not None, (key, side)
    return s.flags


# --------------------------------------------------------------------------- settings


def test_default_settings_from_toml(settings: MeasurementSettings) -> None:
    assert settings.fat_min_hu == -190.0 and settings.fat_max_hu == -30.0
    assert settings.metal_threshold_hu == 2000.0 and settings.metal_proximity_mm == 15.0
    assert settings.threshold_female_kg_m2 == 5.4 and settings.threshold_male_kg_m2 == 7.0
    assert settings.calibrated_for_ct is False
    assert "AWGS 2014" in settings.threshold_source and "not calibrated" in settings.threshold_source
    assert settings.sarcopenia_group == "all"
    groups = dict(settings.groups)
    assert groups["gluteal"] == ("gluteal",)
    assert set(groups["above_knee"]) == {"anterior", "medial", "posterior", "gluteal"}
    assert set(groups["all"]) == {"anterior", "medial", "posterior", "gluteal", "other"}
    lo, hi = settings.plausible_range_ml("vastus_lateralis", 1.70)  # type: ignore[misc]
    assert (lo, hi) == pytest.approx((0.25 * 550.0, 3.0 * 550.0))
    lo16, hi16 = settings.plausible_range_ml("vastus_lateralis", 1.60)  # type: ignore[misc]
    assert lo16 == pytest.approx(lo * (1.60 / 1.70) ** 2) and hi16 == pytest.approx(hi * (1.60 / 1.70) ** 2)
    assert settings.plausible_range_ml("multifidus", 1.70) is None  # never whole in a thigh CT


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    text = DEFAULT_MEASUREMENT_PATH.read_text(encoding="utf-8")
    bad = tmp_path / "m.toml"
    bad.write_text(text.replace('group = "all"', 'group = "thighs"'), encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match="sarcopenia group 'thighs'"):
        load_measurement_settings(bad)
    bad.write_text(text.replace('above_knee = ["anterior"', 'above_knee = ["bone"'), encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match="above_knee"):
        load_measurement_settings(bad)
    bad.write_text(text.replace("calibrated_for_ct = false", 'calibrated_for_ct = "no"'), encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match=r"\[sarcopenia\] calibrated_for_ct = 'no'; allowed: true or false"):
        load_measurement_settings(bad)
    bad.write_text(text.replace("proximity_mm = 15.0", ""), encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match=r"\[metal\] proximity_mm is missing"):
        load_measurement_settings(bad)
    with pytest.raises(MeasurementSettingsError, match="do not exist"):
        load_measurement_settings(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- exact values


def test_exact_volume_hu_fat_fraction_and_mass(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank()
    vl = table.by_key("vastus_lateralis").id
    # right: 30 voxels at 50 HU + 10 voxels at -100 HU (fat window) ; left: 20 voxels at 60 HU
    labels[3:5, 2:6, 2:7] = vl  # 2*4*5 = 40 voxels
    sides[3:5, 2:6, 2:7] = SIDE_RIGHT
    block = np.full((2, 4, 5), 50.0, dtype=np.float32)
    block.reshape(-1)[:10] = -100.0
    hu[3:5, 2:6, 2:7] = block
    labels[3:5, 2:4, 9:14] = vl  # 20 voxels
    sides[3:5, 2:4, 9:14] = SIDE_LEFT
    hu[3:5, 2:4, 9:14] = 60.0
    m = _run(hu, labels, sides, table, settings)
    voxel_ml = 8.0 / 1000.0  # 2 x 2 x 2 mm
    assert m.voxel_volume_ml == pytest.approx(voxel_ml)
    right = m.structure("vastus_lateralis", "right")
    left = m.structure("vastus_lateralis", "left")
    both = m.structure("vastus_lateralis", "both")
    assert right is not None and left is not None and both is not None
    assert (right.voxel_count, left.voxel_count, both.voxel_count) == (40, 20, 60)
    assert right.volume_ml == pytest.approx(40 * voxel_ml)
    assert both.volume_ml == pytest.approx(60 * voxel_ml)
    values = np.array([50.0] * 30 + [-100.0] * 10)
    assert right.mean_hu == pytest.approx(12.5)
    assert right.std_hu == pytest.approx(float(values.std()))
    assert right.fat_fraction == pytest.approx(10 / 40)
    assert left.fat_fraction == 0.0 and left.mean_hu == pytest.approx(60.0) and left.std_hu == pytest.approx(0.0, abs=1e-6)
    # mass = Σ (1 + HU/1000) g/cm³ x V_voxel
    assert right.mass_g == pytest.approx((30 * 1.05 + 10 * 0.90) * voxel_ml)
    assert left.mass_g == pytest.approx(20 * 1.06 * voxel_ml)
    assert both.mass_g == pytest.approx(right.mass_g + left.mass_g)
    all_values = np.concatenate([values, np.full(20, 60.0)])
    assert both.mean_hu == pytest.approx(float(all_values.mean()))
    assert both.std_hu == pytest.approx(float(all_values.std()))
    assert "1.0 + HU/1000" in m.density_formula and m.density_formula == DENSITY_FORMULA
    # a structure absent on both sides, and one absent on one side
    assert FLAG_EMPTY in _codes(m, "sartorius", "left") and FLAG_EMPTY in _codes(m, "sartorius", "both")
    assert FLAG_EMPTY not in _codes(m, "vastus_lateralis", "right")


def test_left_right_split_follows_side_map_not_columns(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank()
    gmax = table.by_key("gluteus_maximus").id
    labels[4:6, 4:8, 1:13] = gmax
    sides[4:6, 4:8, 1:4] = SIDE_LEFT  # 24 voxels, deliberately on "low" columns
    sides[4:6, 4:8, 4:13] = SIDE_RIGHT  # 72 voxels
    hu[labels > 0] = 40.0
    m = _run(hu, labels, sides, table, settings)
    assert m.structure("gluteus_maximus", "left").voxel_count == 24  # type: ignore[union-attr]
    assert m.structure("gluteus_maximus", "right").voxel_count == 72  # type: ignore[union-attr]
    assert FLAG_EMPTY in _codes(m, "vastus_lateralis", "left")


def test_rejects_mismatched_grid_and_unknown_ids(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank()
    labels[0, 0, 0] = 99
    with pytest.raises(ValueError, match="ids 0..99"):
        _run(hu, labels, sides, table, settings)
    volume = Volume(hu, _affine(), "1", "2", "3", "4", ())
    seg = Segmentation(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 3), np.uint8), table, "t", "0")
    with pytest.raises(ValueError, match="differs from volume shape"):
        measure(volume, seg, PatientInfo(), settings)


# --------------------------------------------------------------------------- groups, height, SMI


def _group_case(table: LabelTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    hu, labels, sides = _blank((10, 12, 14))
    placed = {"gluteus_medius": 0, "vastus_medialis": 1, "psoas": 2, "femur": 3}
    counts = {}
    for key, row in placed.items():
        lid = table.by_key(key).id
        labels[4:6, 2 + 2 * row : 4 + 2 * row, 2:12] = lid  # 2*2*10 = 40 voxels
        sides[4:6, 2 + 2 * row : 4 + 2 * row, 2:7] = SIDE_RIGHT
        sides[4:6, 2 + 2 * row : 4 + 2 * row, 7:12] = SIDE_LEFT
        counts[key] = 40
    hu[labels > 0] = 50.0
    hu[labels == table.by_key("femur").id] = 700.0
    return hu, labels, sides, counts


def test_group_sums_and_smi_from_explicit_height(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides, _ = _group_case(table)
    m = _run(hu, labels, sides, table, settings, patient=PatientInfo(sex="F", height_m=1.80), height_m=1.60)
    assert m.height_m == 1.60 and m.height_source == "recorded"  # explicit wins over PatientSize
    voxel_ml = 0.008
    muscle_mass = 40 * 1.05 * voxel_ml
    glut = m.group("gluteal")
    ak = m.group("above_knee")
    allm = m.group("all")
    assert glut is not None and ak is not None and allm is not None
    assert glut.volume_ml == pytest.approx(40 * voxel_ml) and glut.mass_g == pytest.approx(muscle_mass)
    assert ak.volume_ml == pytest.approx(80 * voxel_ml)  # gluteus medius + vastus medialis, not psoas
    assert allm.volume_ml == pytest.approx(120 * voxel_ml)  # + psoas, never the femur
    assert "femur" not in allm.structure_keys and "psoas" in allm.structure_keys
    assert "psoas" not in ak.structure_keys
    assert allm.mass_g == pytest.approx(3 * muscle_mass)
    assert allm.smi_kg_m2 == pytest.approx(allm.mass_g / 1000.0 / 2.56)
    assert allm.volume_per_height2_cm3_m2 == pytest.approx(allm.volume_ml / 2.56)
    right, left = m.group("all", "right"), m.group("all", "left")
    assert right is not None and left is not None
    assert right.volume_ml + left.volume_ml == pytest.approx(allm.volume_ml)
    assert right.mass_g == pytest.approx(1.5 * muscle_mass)
    assert not any(f.code == FLAG_NO_HEIGHT for f in m.flags)


def test_patient_size_used_when_nothing_recorded(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides, _ = _group_case(table)
    m = _run(hu, labels, sides, table, settings, patient=PatientInfo(sex="M", height_m=1.75))
    assert m.height_m == 1.75 and m.height_source == "PatientSize"
    g = m.group("all")
    assert g is not None and g.smi_kg_m2 == pytest.approx(g.mass_g / 1000.0 / 1.75**2)


def test_no_height_no_smi_and_study_flag(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides, _ = _group_case(table)
    m = _run(hu, labels, sides, table, settings, patient=PatientInfo(sex="F"))
    assert m.height_m is None and m.height_source == ""
    assert [f for f in m.flags if f.code == FLAG_NO_HEIGHT and f.structure == ""]
    assert all(g.smi_kg_m2 is None and g.volume_per_height2_cm3_m2 is None for g in m.groups)
    assert m.sarcopenia is None


def test_patient_size_in_centimetres_is_not_used(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides, _ = _group_case(table)
    m = _run(hu, labels, sides, table, settings, patient=PatientInfo(sex="F", height_m=165.0))
    assert m.height_m is None
    flag = next(f for f in m.flags if f.code == FLAG_NO_HEIGHT)
    assert "165" in flag.message and "cm" in flag.message
    with pytest.raises(ValueError, match="outside"):
        _run(hu, labels, sides, table, settings, height_m=160.0)


def _big_psoas(n_voxels: int, table: LabelTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n one-litre voxels of psoas at 50 HU (1.05 kg each), split right/left, inside the field of view
    (a slice of background above and below: a psoas cut at the inferior end would withhold "all")."""
    hu, labels, sides = _blank((6, 4, 10))
    flat_l, flat_s = labels.reshape(-1), sides.reshape(-1)
    idx = np.arange(56, 56 + n_voxels)
    flat_l[idx] = table.by_key("psoas").id
    flat_s[idx] = np.where(idx % 2 == 0, SIDE_RIGHT, SIDE_LEFT)
    hu[labels > 0] = 50.0
    return hu, labels, sides, _affine((100.0, 100.0, 100.0))


def test_sarcopenia_by_sex_not_calibrated(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides, affine = _big_psoas(16, table)  # 16.8 kg -> SMI 6.5625 at 1.60 m
    f = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="F"), height_m=1.60)
    m = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="M"), height_m=1.60)
    o = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="O"), height_m=1.60)
    assert f.sarcopenia is not None and m.sarcopenia is not None and o.sarcopenia is None
    assert f.sarcopenia.smi_kg_m2 == pytest.approx(16 * 1.05 / 2.56)
    assert f.sarcopenia.group == "all"
    assert f.sarcopenia.threshold_kg_m2 == 5.4 and not f.sarcopenia.below_threshold
    assert m.sarcopenia.threshold_kg_m2 == 7.0 and m.sarcopenia.below_threshold
    assert not f.sarcopenia.calibrated_for_ct and not m.sarcopenia.calibrated_for_ct
    assert "not calibrated" in f.sarcopenia.source
    hu, labels, sides, affine = _big_psoas(12, table)  # 12.6 kg -> SMI 4.92
    f = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="F"), height_m=1.60)
    assert f.sarcopenia is not None and f.sarcopenia.below_threshold
    calibrated = dataclasses.replace(settings, calibrated_for_ct=True, threshold_female_kg_m2=4.0, threshold_source="site")
    f = _run(hu, labels, sides, table, calibrated, affine, PatientInfo(sex="F"), height_m=1.60)
    assert f.sarcopenia is not None and f.sarcopenia.calibrated_for_ct and not f.sarcopenia.below_threshold


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("z_sign", [1.0, -1.0])
def test_partial_flags_follow_anatomy_not_array_order(z_sign: float, table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank((8, 10, 10))
    top_k, bottom_k = (7, 0) if z_sign > 0 else (0, 7)  # the superior slice is k=7 or k=0
    gmax, vl, am = (table.by_key(k).id for k in ("gluteus_maximus", "vastus_lateralis", "adductor_magnus"))
    inward = 1 if top_k == 0 else -1
    labels[top_k, 1:3, 1:3] = gmax
    labels[top_k + inward, 1:3, 1:3] = gmax
    labels[bottom_k, 5:7, 1:3] = vl
    labels[3:5, 5:7, 5:7] = am  # inside: neither end
    sides[labels > 0] = SIDE_RIGHT
    hu[labels > 0] = 50.0
    m = _run(hu, labels, sides, table, settings, _affine(z_sign=z_sign))
    assert FLAG_PARTIAL_TOP in _codes(m, "gluteus_maximus", "right")
    assert FLAG_PARTIAL_BOTTOM not in _codes(m, "gluteus_maximus", "right")
    assert FLAG_PARTIAL_TOP in _codes(m, "gluteus_maximus", "both")
    assert FLAG_PARTIAL_BOTTOM in _codes(m, "vastus_lateralis", "right")
    assert FLAG_PARTIAL_TOP not in _codes(m, "vastus_lateralis", "right")
    assert not {FLAG_PARTIAL_TOP, FLAG_PARTIAL_BOTTOM} & set(_codes(m, "adductor_magnus", "right"))
    # partial structures are not judged on volume; the tiny adductor magnus (whole) is
    assert FLAG_IMPLAUSIBLE_VOLUME not in _codes(m, "gluteus_maximus", "right")
    assert FLAG_IMPLAUSIBLE_VOLUME in _codes(m, "adductor_magnus", "right")
    assert m.structure("gluteus_maximus", "right").is_partial  # type: ignore[union-attr]
    assert m.group("gluteal", "right").includes_partial  # type: ignore[union-attr]
    flag = next(f for f in m.flags if f.code == FLAG_PARTIAL_TOP and f.structure == "gluteus_maximus")
    assert flag.side == "right" and "upper (superior) end" in flag.message


def test_metal_flag_on_the_implant_side_only(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank((12, 20, 30))
    affine = _affine((2.0, 2.0, 2.0))
    gmed = table.by_key("gluteus_medius").id
    vl = table.by_key("vastus_lateralis").id
    # gluteus medius left (columns 20..23) and right (columns 3..6), vastus lateralis far away on the left
    labels[4:8, 4:8, 20:24] = gmed
    sides[4:8, 4:8, 20:24] = SIDE_LEFT
    labels[4:8, 4:8, 3:7] = gmed
    sides[4:8, 4:8, 3:7] = SIDE_RIGHT
    labels[4:8, 16:20, 20:24] = vl  # 9 rows (18 mm) below the metal
    sides[4:8, 16:20, 20:24] = SIDE_LEFT
    hu[labels > 0] = 50.0
    hu[4:8, 4:8, 26:29] = 3500.0  # metal 6 mm lateral of the left gluteus medius (48 voxels = 0.384 ml)
    hu[0, 0, 0] = 3000.0  # a single hot voxel: below min_volume_ml, ignored
    m = _run(hu, labels, sides, table, settings, affine)
    assert FLAG_METAL in _codes(m, "gluteus_medius", "left")
    assert FLAG_METAL in _codes(m, "gluteus_medius", "both")
    assert FLAG_METAL not in _codes(m, "gluteus_medius", "right")
    # vastus lateralis: nearest voxel (row 16, col 26 vs row 7) is 9 rows = 18 mm > 15 mm away
    assert FLAG_METAL not in _codes(m, "vastus_lateralis", "left")
    metal_flags = [f for f in m.flags if f.code == FLAG_METAL]
    assert [(f.structure, f.side) for f in metal_flags] == [("gluteus_medius", "left")]
    assert "patient's left" in metal_flags[0].message and "15 mm" in metal_flags[0].message
    # the voxels within 15 mm (what pipeline.compare's metal withholding decides from): all 64 of the left
    # gluteus medius (at most 12 mm from the metal), none elsewhere
    near = {(s.key, s.side): s.near_metal_voxels for s in m.structures if s.near_metal_voxels}
    assert near == {("gluteus_medius", "left"): 64, ("gluteus_medius", "both"): 64}
    assert m.metal_proximity_mm == 15.0
    wider = dataclasses.replace(settings, metal_proximity_mm=20.0)
    m = _run(hu, labels, sides, table, wider, affine)
    assert FLAG_METAL in _codes(m, "vastus_lateralis", "left")
    # 20 mm reaches its top row (18 mm below) in the two columns within sqrt(20² - 18²) = 8.7 mm: 2 x 4 slices
    assert m.structure("vastus_lateralis", "left").near_metal_voxels == 8  # type: ignore[union-attr]
    assert m.metal_proximity_mm == 20.0


def test_implausible_volume_scales_with_height(table: LabelTable, settings: MeasurementSettings) -> None:
    hu, labels, sides = _blank((10, 10, 10))
    sart = table.by_key("sartorius").id
    labels[2:8, 2:8, 2:8] = sart  # 216 voxels of 1 ml = 216 ml on the right
    sides[labels > 0] = SIDE_RIGHT
    hu[labels > 0] = 50.0
    affine = _affine((10.0, 10.0, 10.0))
    # sartorius typical 160 ml: plausible 40..480 ml at 1.70 m; at 1.00 m 13.8..166 ml
    ok = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="F"), height_m=1.70)
    assert FLAG_IMPLAUSIBLE_VOLUME not in _codes(ok, "sartorius", "right")
    short = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="F"), height_m=1.00)
    assert FLAG_IMPLAUSIBLE_VOLUME in _codes(short, "sartorius", "right")
    flag = next(f for f in short.flags if f.code == FLAG_IMPLAUSIBLE_VOLUME and f.structure == "sartorius")
    assert "216.0 cm³" in flag.message and flag.side == "right"
    assert FLAG_EMPTY in _codes(short, "sartorius", "left")
    empty = next(f for f in short.flags if f.code == FLAG_EMPTY and f.structure == "sartorius")
    assert empty.side == "left" and empty.message == "Sartorius was not found on the left"
    # the same on both sides: one flag for both, naming each side's volume
    labels[2:8, 2:8, 2:8] = 0
    labels[2:8, 2:8, 1:4] = sart
    labels[2:8, 2:8, 5:8] = sart
    sides[:] = 0
    sides[:, :, 1:4][labels[:, :, 1:4] > 0] = SIDE_RIGHT
    sides[:, :, 5:8][labels[:, :, 5:8] > 0] = SIDE_LEFT  # 108 ml each side
    short = _run(hu, labels, sides, table, settings, affine, PatientInfo(sex="F"), height_m=0.75)
    flags = [f for f in short.flags if f.code == FLAG_IMPLAUSIBLE_VOLUME and f.structure == "sartorius"]
    assert [f.side for f in flags] == ["both"]
    assert "right 108.0 cm³" in flags[0].message and "left 108.0 cm³" in flags[0].message
    for side in ("left", "right", "both"):
        assert FLAG_IMPLAUSIBLE_VOLUME in _codes(short, "sartorius", side)


# --------------------------------------------------------------------------- phantom


def _measure_phantom(phantom: Phantom, table: LabelTable, settings: MeasurementSettings) -> Measurements:
    left = phantom.side_of_columns()
    side = np.where(left[None, None, :], SIDE_LEFT, SIDE_RIGHT).astype(np.uint8) * (phantom.labels > 0)
    volume = Volume(phantom.hu, phantom.affine_lps, "1", "2", "3", "4", ())
    seg = Segmentation(phantom.labels, side, table, "phantom", "0", affine_lps=phantom.affine_lps)
    return measure(volume, seg, PatientInfo(sex=phantom.params.sex, height_m=phantom.params.height_m), settings)


def test_phantom_volumes_equal_ground_truth(table: LabelTable, settings: MeasurementSettings) -> None:
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 4.0, 4.0)), table)
    truth = phantom.ground_truth(table)
    m = _measure_phantom(phantom, table, settings)
    for label in table.labels:
        for side in ("left", "right"):
            s = m.structure(label.key, side)
            expected = truth["structures"][label.key][side]
            assert s is not None and s.voxel_count == expected["voxel_count"], (label.key, side)
            assert s.volume_ml == pytest.approx(expected["volume_ml"], abs=1e-3)
        both = m.structure(label.key, "both")
        assert both is not None
        assert both.voxel_count == sum(truth["structures"][label.key][s]["voxel_count"] for s in ("left", "right"))
    # whole phantom: muscles have muscle HU, so mass ≈ 1.04-1.06 x volume
    g = m.group("all")
    assert g is not None and 1.0 < g.mass_g / g.volume_ml < 1.07
    assert not [f for f in m.flags if f.code in (FLAG_METAL, FLAG_IMPLAUSIBLE_VOLUME)]
    assert FLAG_PARTIAL_TOP not in _codes(m, "gluteus_maximus", "both")


def test_phantom_fov_cutting_gluteus_maximus_is_partial(table: LabelTable, settings: MeasurementSettings) -> None:
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 4.0, 4.0), fov_top_mm=-120.0), table)
    m = _measure_phantom(phantom, table, settings)
    for side in ("left", "right", "both"):
        assert FLAG_PARTIAL_TOP in _codes(m, "gluteus_maximus", side)
    g = m.group("gluteal")
    assert g is not None and g.includes_partial


def test_phantom_left_implant_flags_left_structures_only(table: LabelTable, settings: MeasurementSettings) -> None:
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 4.0, 4.0), implant="left"), table)
    m = _measure_phantom(phantom, table, settings)
    left = {s.key for s in m.structures if s.side == "left" and FLAG_METAL in s.flags}
    right = {s.key for s in m.structures if s.side == "right" and FLAG_METAL in s.flags}
    assert right == set()
    assert {"femur", "gluteus_minimus", "obturator_externus"} <= left
    assert left <= set(phantom.metal_structures)  # the phantom lists structures within 20 mm
    # with the phantom's own 20 mm the sets agree exactly
    m20 = _measure_phantom(phantom, table, dataclasses.replace(settings, metal_proximity_mm=20.0))
    left20 = {s.key for s in m20.structures if s.side == "left" and FLAG_METAL in s.flags}
    assert left20 == set(phantom.metal_structures)
    assert all("patient's left" in f.message for f in m.flags if f.code == FLAG_METAL)


# --------------------------------------------------------------------------- groups by coverage


@pytest.fixture(scope="module")
def hip_ct(table: LabelTable, settings: MeasurementSettings) -> Measurements:
    """A hip CT: the field of view ends 250 mm below the iliac crest, cutting the thigh muscles."""
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 3.0, 3.0), fov_bottom_mm=-250.0), table)
    return _measure_phantom(phantom, table, settings)


@pytest.fixture(scope="module")
def full_ct(table: LabelTable, settings: MeasurementSettings) -> Measurements:
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 3.0, 3.0)), table)
    return _measure_phantom(phantom, table, settings)


def test_hip_ct_withholds_above_knee_and_all_reports_gluteal(hip_ct: Measurements) -> None:
    for group in ("above_knee", "all"):
        for side in ("right", "left", "both"):
            g = hip_ct.group(group, side)
            assert g is not None and not g.reported, (group, side)
            assert (g.volume_ml, g.mass_g, g.volume_per_height2_cm3_m2, g.smi_kg_m2) == (None, None, None, None)
            assert g.withheld_reason.startswith("not reported: ")
            assert "cut at the inferior edge of the field of view" in g.withheld_reason
    right = hip_ct.group("above_knee", "right")
    assert right is not None and "vastus lateralis right" in right.withheld_reason and " left" not in right.withheld_reason
    both = hip_ct.group("all", "both")
    assert both is not None and "vastus lateralis right and left" in both.withheld_reason
    # the hamstrings cross the knee: cut at the inferior edge they are not what withholds the group
    assert "biceps femoris" not in both.withheld_reason
    for side in ("right", "left", "both"):
        g = hip_ct.group("gluteal", side)
        assert g is not None and g.reported and g.withheld_reason == ""
        members = [hip_ct.structure(k, side) for k in g.structure_keys]
        assert g.volume_ml == pytest.approx(sum(m.volume_ml for m in members if m))
        assert g.smi_kg_m2 == pytest.approx(sum(m.mass_g for m in members if m) / 1000.0 / hip_ct.height_m**2)  # type: ignore[operator]
        assert g.volume_per_height2_cm3_m2 is not None and not g.includes_partial


def test_hip_ct_sarcopenia_not_assessed_names_gluteal_smi(
    hip_ct: Measurements, table: LabelTable, settings: MeasurementSettings
) -> None:
    assert hip_ct.sarcopenia is None
    note = hip_ct.sarcopenia_not_assessed
    glut = hip_ct.group("gluteal")
    assert note is not None and glut is not None
    assert note.group == "all" and note.reason == "not assessed: all muscles not fully in the field of view"
    assert note.measured_group == "gluteal" and note.measured_smi_kg_m2 == glut.smi_kg_m2
    assert not note.measured_threshold_applied
    # a site threshold for the gluteal group: the screen is made on it
    site = GroupThreshold("gluteal", 0.9, 1.2, True, "site calibration")
    phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 3.0, 3.0), fov_bottom_mm=-250.0), table)
    m = _measure_phantom(phantom, table, dataclasses.replace(settings, group_thresholds=(site,)))
    assert m.sarcopenia is not None and m.sarcopenia.group == "gluteal"
    assert m.sarcopenia.smi_kg_m2 == glut.smi_kg_m2 and m.sarcopenia.calibrated_for_ct
    assert m.sarcopenia.threshold_kg_m2 == site.for_sex(phantom.params.sex)
    assert m.sarcopenia_not_assessed is not None and m.sarcopenia_not_assessed.measured_threshold_applied


def test_full_phantom_reports_every_group_as_before(full_ct: Measurements) -> None:
    assert full_ct.sarcopenia_not_assessed is None and full_ct.sarcopenia is not None
    h2 = full_ct.height_m**2  # type: ignore[operator]
    for g in full_ct.groups:
        assert g.reported and g.withheld_reason == "", (g.group, g.side)
        members = [full_ct.structure(k, g.side) for k in g.structure_keys]
        volume = float(sum(m.volume_ml for m in members if m))
        mass = float(sum(m.mass_g for m in members if m))
        assert (g.volume_ml, g.mass_g) == (volume, mass)  # the very same sums as before
        assert g.smi_kg_m2 == mass / 1000.0 / h2 and g.volume_per_height2_cm3_m2 == volume / h2
    ak = full_ct.group("above_knee")
    assert ak is not None and ak.includes_partial  # the hamstrings are cut at the knee, as before
    assert full_ct.sarcopenia.group == "all"  # type: ignore[union-attr]


def test_absent_muscle_withholds_only_where_the_field_of_view_is_cut(
    table: LabelTable, settings: MeasurementSettings
) -> None:
    hu, labels, sides = _blank((10, 12, 14))
    gmed, gmax, vl = (table.by_key(k).id for k in ("gluteus_medius", "gluteus_maximus", "vastus_lateralis"))
    labels[4:6, 2:4, 2:12] = gmed  # inside
    labels[3:7, 6:8, 2:12] = vl  # inside
    sides[labels > 0] = SIDE_RIGHT
    sides[:, :, 7:][labels[:, :, 7:] > 0] = SIDE_LEFT
    hu[labels > 0] = 50.0
    covered = _run(hu, labels, sides, table, settings, height_m=1.6)
    g = covered.group("gluteal", "right")
    # gluteus maximus found nowhere in a covered region: the model's failure, flagged, group reported
    assert g is not None and g.reported and FLAG_EMPTY in _codes(covered, "gluteus_maximus", "right")
    labels[0:3, 9:11, 2:7] = gmax  # cut at the inferior end on the right: the region is not covered there
    sides[0:3, 9:11, 2:7] = SIDE_RIGHT
    labels[4:6, 2:4, 2:7] = 0  # and gluteus medius is gone on the right
    cut = _run(hu, labels, sides, table, settings, height_m=1.6)
    right, left = cut.group("gluteal", "right"), cut.group("gluteal", "left")
    assert right is not None and left is not None and cut.group("gluteal", "both") is not None
    assert "gluteus maximus right cut at the inferior edge of the field of view" in right.withheld_reason
    assert "gluteus medius right" in right.withheld_reason and "not in the field of view" in right.withheld_reason
    assert left.reported  # nothing is cut on the left: the missing left muscles are not found, not absent
    assert not cut.group("gluteal", "both").reported  # type: ignore[union-attr]


def test_group_coverage_and_site_thresholds_from_toml(tmp_path: Path, settings: MeasurementSettings) -> None:
    assert "sartorius" in settings.crossing_inferior and "psoas" in settings.crossing_superior
    assert "vastus_lateralis" not in settings.crossing_inferior and settings.group_thresholds == ()
    text = DEFAULT_MEASUREMENT_PATH.read_text(encoding="utf-8")
    path = tmp_path / "m.toml"
    path.write_text(
        text + '\n[sarcopenia.group_thresholds.gluteal]\nthreshold_female_kg_m2 = 1.9\nthreshold_male_kg_m2 = 2.4\n'
        'calibrated_for_ct = true\nsource = "site"\n',
        encoding="utf-8",
    )
    loaded = load_measurement_settings(path)
    assert loaded.group_thresholds == (GroupThreshold("gluteal", 1.9, 2.4, True, "site"),)
    path.write_text(path.read_text(encoding="utf-8").replace("group_thresholds.gluteal", "group_thresholds.thighs"),
                    encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match=r"group_thresholds\.thighs: group must be one of"):
        load_measurement_settings(path)


def test_superior_edge_counts_only_below_the_iliac_crest(table: LabelTable, settings: MeasurementSettings) -> None:
    # the scan starts 20 mm below the iliac crest: the ilium is cut, and so are the gluteus medius and iliacus
    low = _measure_phantom(
        generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 3.0, 3.0), fov_top_mm=-20.0), table), table, settings
    )
    assert FLAG_PARTIAL_TOP in _codes(low, "ilium", "right")
    glut = low.group("gluteal", "right")
    assert glut is not None and not glut.reported
    assert "gluteus medius right cut at the superior edge of the field of view" in glut.withheld_reason
    allm = low.group("all", "right")
    assert allm is not None and "iliacus right" in allm.withheld_reason
    assert "psoas" not in allm.withheld_reason  # runs into the trunk: cut by any scan of the region
    # a whole phantom whose gluteus medius touches the top slice while the ilium is whole: reported
    touching = _measure_phantom(
        generate_phantom(PhantomParams(seed=5, spacing_mm=(4.0, 3.0, 3.0), height_m=1.6, sex="F"), table),
        table, settings,
    )
    assert FLAG_PARTIAL_TOP in _codes(touching, "gluteus_medius", "right")
    assert FLAG_PARTIAL_TOP not in _codes(touching, "ilium", "right")
    assert all(g.reported for g in touching.groups)
    strict = _measure_phantom(
        generate_phantom(PhantomParams(seed=5, spacing_mm=(4.0, 3.0, 3.0), height_m=1.6, sex="F"), table),
        table, dataclasses.replace(settings, superior_landmark="no_such_structure"),
    )
    assert not any(g.reported for g in strict.groups)  # without the landmark the touching label counts


def test_a_hip_ct_ending_below_the_lesser_trochanter_reports_the_gluteal_group_over_its_field_of_view(
    table: LabelTable, settings: MeasurementSettings
) -> None:
    """Paper 004's hip CTs end about the lesser trochanter: the gluteus maximus's insertion is cut, yet the
    gluteal group is measured. Here: the femur reaches >= gluteal_min_reach_mm above the inferior edge ->
    reported (marked partial, the cut muscle keeps its flag); a scan through the femoral head -> withheld."""
    def hip_ct(bottom_mm: float, s: MeasurementSettings) -> Measurements:
        phantom = generate_phantom(PhantomParams(seed=3, spacing_mm=(4.0, 3.0, 3.0), fov_bottom_mm=bottom_mm), table)
        return _measure_phantom(phantom, table, s)

    low = hip_ct(-150.0, settings)  # about 70 mm of femur in view
    glut = low.group("gluteal")
    assert glut is not None and glut.reported and glut.includes_partial and glut.smi_kg_m2 > 0
    assert FLAG_PARTIAL_BOTTOM in _codes(low, "gluteus_maximus", "right")
    assert not low.group("above_knee").reported  # type: ignore[union-attr]
    high = hip_ct(-120.0, settings)  # about 40 mm: through the femoral head
    reason = high.group("gluteal").withheld_reason  # type: ignore[union-attr]
    assert reason.startswith("not reported: gluteus maximus right and left") and "cut at the inferior edge" in reason
    strict = hip_ct(-150.0, dataclasses.replace(settings, gluteal_min_reach_mm=1000.0))
    assert not strict.group("gluteal").reported  # type: ignore[union-attr]


def test_gluteal_min_reach_is_read_and_checked(tmp_path: Path) -> None:
    text = DEFAULT_MEASUREMENT_PATH.read_text(encoding="utf-8")
    assert load_measurement_settings().gluteal_min_reach_mm == 50.0
    path = tmp_path / "m.toml"
    path.write_text(text.replace("gluteal_min_reach_mm = 50.0", "gluteal_min_reach_mm = 65"), encoding="utf-8")
    assert load_measurement_settings(path).gluteal_min_reach_mm == 65.0
    path.write_text(text.replace("gluteal_min_reach_mm = 50.0", "gluteal_min_reach_mm = -1"), encoding="utf-8")
    with pytest.raises(MeasurementSettingsError, match=r"gluteal_min_reach_mm = -1; allowed: a number of mm >= 0"):
        load_measurement_settings(path)
