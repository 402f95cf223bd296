"""The results database: heights and measurements round-trip; priors are found by patient."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.types import GroupMeasurement, Measurements, QualityFlag, StructureMeasurement
from thighnode.results import ResultsError, ResultsStore


def _measurements(volume: float) -> Measurements:
    s = StructureMeasurement(
        label_id=11, key="gluteus_maximus", name="Gluteus maximus", group="gluteal", side="right",
        voxel_count=1000, volume_ml=volume, mean_hu=45.5, std_hu=12.0, mass_g=volume * 1.045,
        fat_fraction=0.05, flags=("partial_fov_top",),
    )
    g = GroupMeasurement(
        group="gluteal", side="both", structure_keys=("gluteus_maximus",), volume_ml=volume,
        mass_g=volume * 1.045, volume_per_height2_cm3_m2=volume / 2.56, smi_kg_m2=volume * 1.045 / 1000 / 2.56,
        includes_partial=True,
    )
    return Measurements(
        structures=(s,), groups=(g,),
        flags=(QualityFlag("partial_fov_top", "cut at the top", "gluteus_maximus", "right"),),
        height_m=1.6, height_source="PatientSize", sex="F", density_formula="1+HU/1000", voxel_volume_ml=0.008,
    )


def test_heights_are_validated_and_recorded(database: Path | str) -> None:
    store = ResultsStore(database)
    with pytest.raises(ResultsError, match="allowed 0.5..2.5"):
        store.set_height("P1", 172)
    store.set_height("P1", 1.72)
    store.set_height("P1", 1.74)
    assert store.height("P1") == 1.74
    assert store.height("P1", issuer="HOSP") == 1.74  # an issuer-less record matches
    assert store.height("P2") is None
    store.close()


def test_results_round_trip_and_are_replaced_on_reprocessing(database: Path | str) -> None:
    store = ResultsStore(database)
    common = dict(series_uid="1.2.3.9", patient_id="P1", issuer="", model_name="m", model_version="1")
    store.save(study_uid="1.2.3", job_id=1, study_date="20240101", measurements=_measurements(500.0), **common)
    store.save(study_uid="1.2.3", job_id=2, study_date="20240101", measurements=_measurements(510.0), **common)
    store.save(study_uid="1.2.4", job_id=3, study_date="20240601", measurements=_measurements(450.0), **common)
    got = store.get("1.2.3")
    assert got is not None and got.job_id == 2
    s = got.measurements.structure("gluteus_maximus", "right")
    assert s is not None and s.volume_ml == 510.0 and s.flags == ("partial_fov_top",)
    assert got.measurements.group("gluteal").smi_kg_m2 == pytest.approx(510 * 1.045 / 1000 / 2.56)
    assert got.measurements.flags[0].structure == "gluteus_maximus"
    assert [r.study_uid for r in store.studies_of_patient("P1")] == ["1.2.3", "1.2.4"]
    store.close()


def test_withheld_group_is_not_stored(database: Path | str) -> None:
    """A group the field of view does not cover has no values: it is not stored, and a prior read
    back has no such group (its comparison says "not reported in the prior study")."""
    m = _measurements(500.0)
    withheld = GroupMeasurement(
        group="all", side="both", structure_keys=("vastus_lateralis",), volume_ml=None, mass_g=None,
        volume_per_height2_cm3_m2=None, smi_kg_m2=None, includes_partial=True,
        withheld_reason="not reported: vastus lateralis right cut at the inferior edge of the field of view",
    )
    m = Measurements(**{**m.__dict__, "groups": (*m.groups, withheld)})
    store = ResultsStore(database)
    store.save(study_uid="1.2.3", job_id=1, study_date="20240101", measurements=m, series_uid="1.2.3.9",
               patient_id="P1", issuer="", model_name="m", model_version="1")
    got = store.get("1.2.3")
    assert got is not None and got.measurements.group("all") is None
    assert got.measurements.group("gluteal") is not None
    store.close()


def test_comparisons_round_trip(database: Path | str) -> None:
    from pipeline.types import Comparison, StructureChange

    change = StructureChange(
        key="vastus_lateralis", name="Vastus lateralis", group="anterior", side="right", compared=True, reason="",
        common_range_mm=(-300.0, -80.0), prior_volume_ml=600.0, current_volume_ml=540.0, change_ml=-60.0,
        change_ratio=-0.1, change_per_height2_cm3_m2=-60 / 2.56, prior_mass_g=630.0, current_mass_g=565.0,
        change_mass_g=-65.0, prior_mean_hu=50.0, current_mean_hu=45.0, change_mean_hu=-5.0,
        prior_fat_fraction=0.03, current_fat_fraction=0.05, change_fat_fraction=0.02, flags=("metal",),
    )
    comp = Comparison(
        prior_study_uid="1.2.3", prior_study_date="20240101", current_study_date="20240301", interval_days=60,
        landmark="top of femoral head", method="common range", changes=(change,), operated_side="right", height_m=1.6,
        axis_text={"right": "from the landmark", "left": "in the current scan's patient z, aligned by bone profile"},
    )
    store = ResultsStore(database)
    store.save_comparison("1.2.4", comp)
    assert store.comparison("1.2.4") == comp
    assert list(store.comparisons()) == ["1.2.4"]
    store.close()


def test_profiles_round_trip(database: Path | str) -> None:
    import dataclasses

    from pipeline.types import AnatomicalProfiles, BoneProfile, StructureProfile

    prof = AnatomicalProfiles(
        landmark="top of the femoral head",
        landmark_z_mm={"right": -80.5, "left": None},
        fov_z_mm={"right": (-400.0, 120.0), "left": None},
        metal_z_mm={"right": None, "left": (-150.0, 10.0)},
        profiles=(
            StructureProfile(key="sartorius", side="right", z_mm=(-10.0, -7.0), area_mm2=(100.0, 120.5),
                             mean_hu=(50.0, 49.0), voxels=(10, 12), fat_voxels=(0, 1), slice_mm=3.0),
        ),
    )
    bone = BoneProfile(z_mm=(-12.5, -9.5, -6.5), area_mm2=(300.0, 410.5, 0.0), metal=(False, True, False), slice_mm=3.0)
    with_bone = dataclasses.replace(prof, bone={"right": bone, "left": None}, landmark_reliable={"right": True, "left": False})
    store = ResultsStore(database)
    store.save_profiles("1.2.3", prof)
    assert store.profiles("1.2.3") == prof
    store.save_profiles("1.2.5", with_bone)
    assert store.profiles("1.2.5") == with_bone
    assert store.profiles("9.9") is None
    store.close()


def test_profiles_stored_before_bone_profiles_load_without_them(tmp_path: Path) -> None:
    """A payload written before the bone profiles existed (no "bone", no "landmark_reliable") still loads."""
    import json
    import sqlite3
    import zlib

    store = ResultsStore(tmp_path / "r.db")
    store.close()
    old = {
        "landmark": "top of the femoral head", "landmark_z_mm": {"right": -80.5, "left": None},
        "fov_z_mm": {"right": [-400.0, 120.0], "left": None}, "metal_z_mm": {"right": None, "left": None},
        "profiles": [],
    }
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("INSERT INTO study_profiles(study_uid, profiles_zjson) VALUES (?, ?)",
               ("1.2.3", zlib.compress(json.dumps(old).encode("utf-8"))))
    db.commit()
    db.close()
    store = ResultsStore(tmp_path / "r.db")
    prof = store.profiles("1.2.3")
    store.close()
    assert prof is not None and prof.bone == {} and prof.landmark_reliable == {}
    assert prof.fov_z_mm == {"right": (-400.0, 120.0), "left": None} and prof.landmark_z_mm["right"] == -80.5


def test_voxels_near_metal_round_trip_for_the_metal_withholding(database: Path | str) -> None:
    """pipeline.compare withholds a change from a prior's share of voxels near metal too: the counts
    and their distance are kept, and older records without them read back as none near metal."""
    import dataclasses

    m = _measurements(500.0)
    m = dataclasses.replace(m, metal_proximity_mm=12.0,
                            structures=(dataclasses.replace(m.structures[0], near_metal_voxels=230),))
    store = ResultsStore(database)
    common = dict(series_uid="1.2.3.9", patient_id="P1", issuer="", model_name="m", model_version="1")
    store.save(study_uid="1.2.3", job_id=1, study_date="20240101", measurements=m, **common)
    store.save(study_uid="1.2.4", job_id=2, study_date="20240601", measurements=_measurements(450.0), **common)
    got = store.get("1.2.3")
    assert got is not None and got.measurements.metal_proximity_mm == 12.0
    assert got.measurements.structure("gluteus_maximus", "right").near_metal_voxels == 230  # type: ignore[union-attr]
    assert "near_metal_voxels" not in got.extra
    other = store.get("1.2.4")
    assert other is not None and other.measurements.structure("gluteus_maximus", "right").near_metal_voxels == 0  # type: ignore[union-attr]
    store.close()
