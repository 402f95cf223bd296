"""select_series / classify_kernel / patient_info."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage

from pipeline.errors import DeclinedError, SelectionError, VolumeError
from pipeline.selection import classify_kernel, patient_info, select_series
from pipeline.volume import load_volume
from tests.support.synthetic_ct import DEFAULT_PATIENT, write_ct_series, write_localizer

GRID = dict(rows=8, cols=8)


def _series(tmp_path: Path, name: str, **kwargs) -> tuple[str, list[Path]]:
    kwargs.setdefault("n_slices", 20)
    paths = write_ct_series(tmp_path / name, **GRID, seed=name, **kwargs)
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID), paths


def _study_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_soft_tissue_kernel_wins_over_bone_and_localizer_is_skipped(tmp_path: Path) -> None:
    bone_uid, bone = _series(tmp_path, "bone", kernel="B70f", description="Thigh 1.0 B70f", series_number=3)
    soft_uid, soft = _series(tmp_path, "soft", kernel="B30f", description="Thigh 1.0 B30f", series_number=2)
    loc = write_localizer(tmp_path / "loc")
    loc_uid = str(pydicom.dcmread(loc).SeriesInstanceUID)
    study = _study_uid(soft)
    assert _study_uid(bone) == study == str(pydicom.dcmread(loc).StudyInstanceUID)

    chosen = select_series({bone_uid: bone, soft_uid: soft, loc_uid: [loc]}, study_instance_uid=study)

    assert chosen.series_instance_uid == soft_uid
    assert chosen.paths == tuple(sorted(soft))
    assert chosen.convolution_kernel == "B30f"
    assert chosen.description == "Thigh 1.0 B30f"
    assert chosen.slice_thickness_mm == pytest.approx(2.0)
    assert "soft-tissue kernel" in chosen.rule and "B70f" in chosen.rule
    reasons = dict(chosen.rejected)
    assert set(reasons) == {bone_uid, loc_uid}
    assert "LOCALIZER" in reasons[loc_uid]
    assert f"lost to {soft_uid}" in reasons[bone_uid] and "soft-tissue kernel" in reasons[bone_uid]


def test_ge_standard_wins_over_boneplus_even_when_bone_is_thinner(tmp_path: Path) -> None:
    bone_uid, bone = _series(tmp_path, "bone", kernel="BONEPLUS", slice_spacing=1.0)
    soft_uid, soft = _series(tmp_path, "soft", kernel="STANDARD", slice_spacing=2.5)
    chosen = select_series({bone_uid: bone, soft_uid: soft}, study_instance_uid=_study_uid(soft))
    assert chosen.series_instance_uid == soft_uid


def test_bone_series_alone_is_still_selected(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path, "bone", kernel="BONE")
    chosen = select_series({uid: paths}, study_instance_uid=_study_uid(paths))
    assert chosen.series_instance_uid == uid
    assert chosen.rule.startswith("only series passing the rules")


def test_thinnest_then_most_coverage(tmp_path: Path) -> None:
    thick_uid, thick = _series(tmp_path, "thick", slice_spacing=3.0)
    thin_uid, thin = _series(tmp_path, "thin", slice_spacing=1.0)
    long_uid, long_ = _series(tmp_path, "long", slice_spacing=1.0, n_slices=30)
    study = _study_uid(thin)
    chosen = select_series({thick_uid: thick, thin_uid: thin, long_uid: long_}, study_instance_uid=study)
    assert chosen.series_instance_uid == long_uid
    assert "most coverage" in chosen.rule and "29.0 mm coverage vs 19.0 mm coverage" in chosen.rule
    reasons = dict(chosen.rejected)
    assert "'thinnest slices': 3 mm slices vs 1 mm slices" in reasons[thick_uid]
    assert "most coverage" in reasons[thin_uid]

    chosen = select_series({thick_uid: thick, thin_uid: thin}, study_instance_uid=study)
    assert chosen.series_instance_uid == thin_uid
    assert "thinnest slices" in chosen.rule


def test_original_primary_preferred_and_derived_only_if_nothing_else(tmp_path: Path) -> None:
    derived_uid, derived = _series(
        tmp_path, "mpr", image_type=("DERIVED", "SECONDARY", "AXIAL"), slice_spacing=1.0, description="MPR"
    )
    orig_uid, orig = _series(tmp_path, "orig", slice_spacing=3.0)
    study = _study_uid(orig)
    chosen = select_series({derived_uid: derived, orig_uid: orig}, study_instance_uid=study)
    assert chosen.series_instance_uid == orig_uid
    assert "ORIGINAL\\PRIMARY" in chosen.rule
    assert "DERIVED\\SECONDARY\\AXIAL" in dict(chosen.rejected)[derived_uid]

    chosen = select_series({derived_uid: derived}, study_instance_uid=study)
    assert chosen.series_instance_uid == derived_uid
    assert "DERIVED/SECONDARY series (ImageType DERIVED\\SECONDARY\\AXIAL) used because no ORIGINAL\\PRIMARY" in chosen.rule


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(modality="MR"), "Modality is 'MR'; allowed: 'CT'"),
        (
            dict(sop_class_uid=EnhancedCTImageStorage),
            "SOPClassUID is 1.2.840.10008.5.1.4.1.1.2.1 (Enhanced CT Image Storage) (multi-frame Enhanced CT is not supported",
        ),
        (dict(image_type=("ORIGINAL", "PRIMARY", "SCOUT")), "ImageType is ORIGINAL\\PRIMARY\\SCOUT in 20 of 20"),
        (dict(row_dir=(0, 1, 0), col_dir=(0, 0, -1)), "not axial: slice normal is 90.0 degrees from the patient z axis"),
        (dict(row_dir=(1, 0, 0), col_dir=(0, 0.866025, -0.5)), "not axial: slice normal is 30.0 degrees"),
        (dict(n_slices=19), "19 instance(s); at least 20 required"),
        (dict(slice_spacing=6.0), "slice thickness is 6 mm; allowed: <= 5 mm"),
        (dict(slice_thickness=5.5, slice_spacing=4.0), "slice thickness is 5.5 mm; allowed: <= 5 mm"),
        (dict(study_uid="1.2.3.4"), "20 instance(s) have StudyInstanceUID '1.2.3.4'; expected"),
    ],
    ids=["mr", "enhanced", "scout", "sagittal", "oblique-30", "few", "thick", "thick-tag", "other-study"],
)
def test_hard_rules_reject_with_reason(tmp_path: Path, kwargs: dict, reason: str) -> None:
    good_uid, good = _series(tmp_path, "good")
    bad_uid, bad = _series(tmp_path, "bad", **kwargs)
    chosen = select_series({good_uid: good, bad_uid: bad}, study_instance_uid=_study_uid(good))
    assert chosen.series_instance_uid == good_uid
    assert reason in dict(chosen.rejected)[bad_uid]


def test_oblique_within_limit_is_axial(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path, "obl", row_dir=(1, 0, 0), col_dir=(0, 0.9659258, -0.2588190))  # 15 degrees
    assert select_series({uid: paths}, study_instance_uid=_study_uid(paths)).series_instance_uid == uid


def test_selected_series_loads_from_its_headers_reading_each_file_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, paths = _series(tmp_path, "thin", reverse_file_order=True)
    reference, study_uid = load_volume(paths), _study_uid(paths)
    reads: list[tuple[Path, bool]] = []
    real = pydicom.dcmread

    def recording(fp, *args, **kwargs):
        reads.append((Path(fp), bool(kwargs.get("stop_before_pixels"))))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recording)
    chosen = select_series({uid: paths}, study_instance_uid=study_uid)
    vol = load_volume(chosen.paths, headers=chosen.headers)

    # Once for its header (selection), once for its pixels (loading): no file's header is parsed twice.
    assert sorted(reads) == sorted([(p, True) for p in paths] + [(p, False) for p in paths])
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine_lps, reference.affine_lps)
    assert vol.sop_instance_uids == reference.sop_instance_uids


def test_tilted_axial_series_is_selected_then_declined_by_load_volume(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path, "tilt", gantry_tilt=22.0)
    chosen = select_series({uid: paths}, study_instance_uid=_study_uid(paths))
    assert chosen.series_instance_uid == uid
    with pytest.raises(VolumeError, match=r"tilt.*22 degrees"):
        load_volume(chosen.paths)


def test_real_ge_tilt_series_is_selected(shared_data: Path) -> None:
    paths = sorted((shared_data / "ge-gantry-tilt-ct" / "In_GE").glob("*.dcm"))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    chosen = select_series({str(ds.SeriesInstanceUID): paths}, study_instance_uid=str(ds.StudyInstanceUID))
    assert len(chosen.paths) == 28


def test_real_tcia_series_is_selected(shared_data: Path) -> None:
    paths = sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm"))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    chosen = select_series({str(ds.SeriesInstanceUID): paths}, study_instance_uid=str(ds.StudyInstanceUID))
    assert chosen.series_instance_uid == str(ds.SeriesInstanceUID)
    assert chosen.convolution_kernel == "B"  # Philips B: soft tissue
    assert chosen.slice_thickness_mm == pytest.approx(3.0)


def test_selection_error_lists_every_series(tmp_path: Path) -> None:
    mr_uid, mr = _series(tmp_path, "mr", modality="MR", description="T1 thighs")
    few_uid, few = _series(tmp_path, "few", n_slices=5, description="short")
    loc = write_localizer(tmp_path / "loc")
    loc_uid = str(pydicom.dcmread(loc).SeriesInstanceUID)
    study = _study_uid(mr)
    with pytest.raises(SelectionError) as info:
        select_series({mr_uid: mr, few_uid: few, loc_uid: [loc]}, study_instance_uid=study)
    msg = str(info.value)
    assert isinstance(info.value, DeclinedError)
    assert info.value.study_uid == study
    assert f"{mr_uid} ('T1 thighs'): Modality is 'MR'" in msg
    assert f"{few_uid} ('short'): 5 instance(s); at least 20 required" in msg
    assert f"{loc_uid} ('Topogram 0.6 T20f'): ImageType is ORIGINAL\\PRIMARY\\LOCALIZER" in msg
    assert "checked 3 series" in msg


def test_selection_error_for_empty_study() -> None:
    with pytest.raises(SelectionError, match="holds no series"):
        select_series({}, study_instance_uid="1.2.3")


def test_unreadable_file_rejects_series(tmp_path: Path) -> None:
    uid, paths = _series(tmp_path, "broken")
    paths[0].write_bytes(b"garbage")
    with pytest.raises(SelectionError, match="CT0000.dcm is not readable as DICOM"):
        select_series({uid: paths}, study_instance_uid="1.2.3")


@pytest.mark.parametrize(
    "kernel, description, expected",
    [
        ("B30f", "", "soft"),
        ("Br40d", "", "soft"),
        ("I26f", "", "soft"),
        ("Q40f", "", "soft"),
        ("B70f", "", "sharp"),
        ("Br64d", "", "sharp"),
        ("I70f", "", "sharp"),
        ("Hr60", "", "sharp"),
        ("Bl57d", "", "lung"),
        ("STANDARD", "", "soft"),
        ("SOFT", "", "soft"),
        ("STD+", "", "soft"),
        ("BONE", "", "bone"),
        ("BONEPLUS", "", "bone"),
        ("LUNG", "", "lung"),
        ("EDGE", "", "sharp"),
        ("DETAIL", "", "sharp"),
        ("A", "", "soft"),
        ("B", "", "soft"),
        ("C", "", "soft"),
        ("YA", "", "soft"),
        ("D", "", "sharp"),
        ("E", "", "sharp"),
        ("L", "", "lung"),
        ("YB", "", "sharp"),
        ("FC07", "", "soft"),
        ("FC18", "", "soft"),
        ("FC30", "", "sharp"),
        ("FC52", "", "sharp"),
        ("", "Thigh bone window", "bone"),
        ("", "Lung 1mm", "lung"),
        ("", "Sharp recon", "sharp"),
        ("", "Thighs soft tissue 3mm", "soft"),
        ("UNKNOWN-K", "", "soft"),
    ],
)
def test_classify_kernel(kernel: str, description: str, expected: str) -> None:
    assert classify_kernel(kernel, description) == expected


def test_patient_info(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "a", n_slices=1, **GRID)
    info = patient_info(pydicom.dcmread(paths[0], stop_before_pixels=True))
    assert info.patient_id == DEFAULT_PATIENT["PatientID"]
    assert info.issuer_of_patient_id == DEFAULT_PATIENT["IssuerOfPatientID"]
    assert info.patient_name == DEFAULT_PATIENT["PatientName"]
    assert info.birth_date == DEFAULT_PATIENT["PatientBirthDate"]
    assert info.sex == "F"
    assert info.age == "064Y"
    assert info.height_m == pytest.approx(1.68)
    assert info.weight_kg == pytest.approx(72.0)


@pytest.mark.parametrize(
    "size, weight, height_m, weight_kg",
    [("", "", None, None), ("0", "0", None, None), ("168", "80.5", None, 80.5), ("1.9", "-3", 1.9, None)],
)
def test_patient_info_missing_or_implausible_size(
    tmp_path: Path, size: str, weight: str, height_m: float | None, weight_kg: float | None
) -> None:
    paths = write_ct_series(tmp_path, n_slices=1, **GRID, patient={"PatientSize": size, "PatientWeight": weight})
    info = patient_info(pydicom.dcmread(paths[0], stop_before_pixels=True))
    assert info.height_m == (pytest.approx(height_m) if height_m is not None else None)
    assert info.weight_kg == (pytest.approx(weight_kg) if weight_kg is not None else None)


def test_patient_info_absent_attributes(tmp_path: Path) -> None:
    paths = write_ct_series(
        tmp_path, n_slices=1, **GRID, extra={"PatientSize": None, "PatientWeight": None, "PatientSex": None}
    )
    info = patient_info(pydicom.dcmread(paths[0], stop_before_pixels=True))
    assert (info.height_m, info.weight_kg, info.sex) == (None, None, "")
