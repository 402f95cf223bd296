"""Tests of the labelled thigh/hip CT phantom (modelkit/phantom*.py), on coarse grids."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from modelkit.phantom import (
    NIFTI_LPS_TO_RAS,
    Phantom,
    PhantomError,
    PhantomParams,
    generate_phantom,
    ground_truth,
    write_dicom_series,
    write_ground_truth,
    write_nifti_pair,
)
from modelkit.phantom_dataset import generate_dataset
from pipeline.labels import LabelTable, load_label_table
from tests.conftest import require_tool

SPACING = (4.0, 4.0, 4.0)
TOP_STRUCTURES = ("abdominal_oblique", "rectus_abdominis", "multifidus", "psoas", "iliacus", "piriformis")


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def default_phantom(table: LabelTable) -> Phantom:
    return generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING), table)


def _volumes(phantom: Phantom, table: LabelTable) -> dict[str, dict[str, float]]:
    gt = ground_truth(phantom, table)
    return {k: {s: v[s]["volume_ml"] for s in ("left", "right")} for k, v in gt["structures"].items()}


def _z_of_slices(phantom: Phantom) -> np.ndarray:
    k = np.arange(phantom.hu.shape[0])
    return phantom.affine_lps[2, 3] + phantom.affine_lps[2, 0] * k


def test_all_labels_present_on_both_sides(default_phantom: Phantom, table: LabelTable) -> None:
    vols = _volumes(default_phantom, table)
    assert set(vols) == set(table.keys())
    missing = [(k, s) for k, v in vols.items() for s in ("left", "right") if v[s] <= 0.0]
    assert missing == []
    assert set(np.unique(default_phantom.labels)) == set(range(len(table.labels) + 1))


def test_arrays_types_and_affine(default_phantom: Phantom) -> None:
    assert default_phantom.hu.dtype == np.float32
    assert default_phantom.labels.dtype == np.uint8
    a = default_phantom.affine_lps
    assert a.shape == (4, 4)
    # HFS axial: k -> +z, r -> +y (posterior), c -> +x (patient left)
    assert a[2, 0] == pytest.approx(SPACING[0]) and a[1, 1] == pytest.approx(SPACING[1]) and a[0, 2] == pytest.approx(SPACING[2])
    z = _z_of_slices(default_phantom)
    assert z.max() >= 0.0 and z.min() < -400.0  # crest ... knee


def test_hu_ranges_per_tissue(default_phantom: Phantom, table: LabelTable) -> None:
    hu, lab = default_phantom.hu, default_phantom.labels
    femur = hu[lab == table.by_key("femur").id]
    assert np.percentile(femur, 90) > 700.0  # cortex
    assert np.percentile(femur, 5) < 300.0  # marrow / cancellous inside
    for label in table.labels:
        if label.is_bone:
            continue
        mean = float(hu[lab == label.id].mean())
        assert 0.0 < mean < 100.0, (label.key, mean)
    # subcutaneous / intermuscular fat of the thighs: soft-tissue background below the hips
    z = _z_of_slices(default_phantom)
    thigh = hu[z < -250.0]
    background = thigh[(lab[z < -250.0] == 0) & (thigh > -500.0) & (thigh < 300.0)]
    assert background.size > 1000
    assert np.median(background) < -50.0
    assert hu.min() >= -1024.0
    assert not (hu > 2500.0).any()  # no metal without an implant


def test_left_right_symmetric_without_atrophy(default_phantom: Phantom, table: LabelTable) -> None:
    for key, v in _volumes(default_phantom, table).items():
        assert abs(v["left"] - v["right"]) <= 0.15 * max(v["left"], v["right"]), (key, v)


def test_ground_truth_counts_every_labelled_voxel(default_phantom: Phantom, table: LabelTable) -> None:
    gt = default_phantom.ground_truth(table)
    total = sum(v[s]["voxel_count"] for v in gt["structures"].values() for s in ("left", "right"))
    assert total == int((default_phantom.labels > 0).sum())
    assert gt["absent"] == [] and gt["metal_structures"] == []
    assert gt["params"]["seed"] == 5


def test_atrophy_of_one_side(default_phantom: Phantom, table: LabelTable) -> None:
    atrophied = generate_phantom(
        PhantomParams(seed=5, spacing_mm=SPACING, atrophy={"vastus_lateralis:right": 0.8}), table
    )
    before = _volumes(default_phantom, table)["vastus_lateralis"]
    after = _volumes(atrophied, table)["vastus_lateralis"]
    assert after["right"] / before["right"] == pytest.approx(0.8, abs=0.03)
    assert after["left"] == pytest.approx(before["left"], rel=0.01)
    # freed voxels became background (fat), nothing else changed label
    changed = atrophied.labels != default_phantom.labels
    assert set(np.unique(default_phantom.labels[changed])) == {table.by_key("vastus_lateralis").id}
    assert set(np.unique(atrophied.labels[changed])) == {0}
    assert float(atrophied.hu[changed].mean()) < -30.0


def test_atrophy_both_sides_and_unknown_key(table: LabelTable) -> None:
    base = generate_phantom(PhantomParams(seed=8, spacing_mm=(6.0, 6.0, 6.0)), table)
    both = generate_phantom(PhantomParams(seed=8, spacing_mm=(6.0, 6.0, 6.0), atrophy={"gluteus_medius": 0.5}), table)
    b, a = _volumes(base, table)["gluteus_medius"], _volumes(both, table)["gluteus_medius"]
    for side in ("left", "right"):
        assert a[side] / b[side] == pytest.approx(0.5, abs=0.03)
    with pytest.raises(Exception, match="no_such_muscle"):
        generate_phantom(PhantomParams(seed=8, spacing_mm=(6.0, 6.0, 6.0), atrophy={"no_such_muscle": 0.5}), table)


def test_fov_cut_removes_top_structures(table: LabelTable) -> None:
    cut = generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING, fov_top_mm=-150.0), table)
    assert _z_of_slices(cut).max() <= -150.0
    gt = ground_truth(cut, table)
    for key in TOP_STRUCTURES:
        assert key in gt["absent"]
        assert gt["structures"][key]["left"]["voxel_count"] == 0
    assert "vastus_lateralis" not in gt["absent"]
    low = generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING, fov_bottom_mm=-200.0), table)
    assert _z_of_slices(low).min() >= -200.0
    assert "gluteus_medius" not in ground_truth(low, table)["absent"]


def test_implant_adds_metal_near_the_chosen_femur(default_phantom: Phantom, table: LabelTable) -> None:
    implant = generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING, implant="right"), table)
    metal = implant.hu > 2500.0
    assert metal.sum() > 20
    k, r, c = np.nonzero(metal)
    x = implant.affine_lps[0, 3] + implant.affine_lps[0, 2] * c
    assert (x < implant.midline_x_mm).mean() > 0.95  # the patient's right is -x
    z = implant.affine_lps[2, 3] + implant.affine_lps[2, 0] * k
    assert -300.0 < z.min() and z.max() < -40.0  # femoral head ... stem
    assert "femur" in implant.metal_structures
    assert len(implant.metal_structures) >= 3
    assert ground_truth(implant, table)["metal_structures"] == list(implant.metal_structures)
    # the left side is untouched by the implant's labels
    left = implant.side_of_columns()
    assert np.array_equal(implant.labels[:, :, left], default_phantom.labels[:, :, left])


def test_determinism(default_phantom: Phantom, table: LabelTable) -> None:
    again = generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING), table)
    assert np.array_equal(again.hu, default_phantom.hu)
    assert np.array_equal(again.labels, default_phantom.labels)
    assert again.midline_x_mm == default_phantom.midline_x_mm
    other = generate_phantom(PhantomParams(seed=6, spacing_mm=SPACING), table)
    assert other.hu.shape != default_phantom.hu.shape or not np.array_equal(other.labels, default_phantom.labels)
    rescan = generate_phantom(PhantomParams(seed=5, spacing_mm=SPACING, scan_seed=99), table)
    assert np.array_equal(rescan.labels, default_phantom.labels)
    assert not np.array_equal(rescan.hu, default_phantom.hu)


def test_subject_variation_changes_size(table: LabelTable) -> None:
    small = generate_phantom(PhantomParams(seed=3, spacing_mm=(6.0, 6.0, 6.0), sex="F", size=0.85, height_m=1.55), table)
    big = generate_phantom(PhantomParams(seed=3, spacing_mm=(6.0, 6.0, 6.0), sex="M", size=1.2, height_m=1.85), table)
    vs, vb = _volumes(small, table), _volumes(big, table)
    assert vb["vastus_lateralis"]["left"] > 1.3 * vs["vastus_lateralis"]["left"]
    assert big.hu.shape[0] > small.hu.shape[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("sex", "X"), ("height_m", 3.0), ("size", 0.2), ("fat_fraction", 0.9), ("implant", "middle"), ("implant_kind", "plate"),
     ("spacing_mm", (2.0, 2.0)), ("noise_hu", -1.0), ("atrophy", {"vastus_lateralis:up": 0.8}),
     ("atrophy", {"vastus_lateralis": 1.5}), ("fov_top_mm", -600.0)],
)
def test_params_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(PhantomError, match=field.split("_")[0]):
        PhantomParams(seed=1, **{field: value})  # type: ignore[arg-type]


def test_nifti_round_trip(default_phantom: Phantom, tmp_path: Path) -> None:
    import nibabel as nib

    ct_path, label_path = write_nifti_pair(default_phantom, tmp_path, "s1")
    assert ct_path.name == "s1_ct.nii.gz" and label_path.name == "s1_label.nii.gz"
    ct, lab = nib.load(str(ct_path)), nib.load(str(label_path))
    for img in (ct, lab):
        np.testing.assert_allclose(NIFTI_LPS_TO_RAS @ img.affine, default_phantom.affine_lps, atol=1e-5)
    assert ct.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(lab.dataobj), default_phantom.labels)
    assert np.array_equal(np.asarray(ct.dataobj), np.rint(default_phantom.hu).astype(np.int16))


def test_ground_truth_json(default_phantom: Phantom, table: LabelTable, tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    write_ground_truth(default_phantom, path, table)
    data = json.loads(path.read_text())
    assert data["structures"]["femur"]["left"]["voxel_count"] > 0
    assert data["midline_x_mm"] == pytest.approx(default_phantom.midline_x_mm)


def test_dicom_series_round_trip(default_phantom: Phantom, tmp_path: Path) -> None:
    import pydicom

    paths = write_dicom_series(
        default_phantom, tmp_path / "dcm", patient_id="P1", patient_name="Doe^Jane", patient_sex="F",
        birth_date="19500101", height_m=1.62, study_uid="1.2.3.4", series_uid="1.2.3.4.5",
        frame_of_reference_uid="1.2.3.4.6", study_date="20240202", accession="ACC1",
    )
    assert len(paths) == default_phantom.hu.shape[0]
    datasets = [pydicom.dcmread(p) for p in paths]
    for p, ds in zip(paths, datasets):
        assert p.name == f"{ds.SOPInstanceUID}.dcm"
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    ds0 = datasets[0]
    assert ds0.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds0.Modality == "CT" and ds0.Manufacturer == "thighnode phantom"
    assert list(ds0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(ds0.PatientSize) == pytest.approx(1.62) and float(ds0.PatientWeight) > 0
    assert ds0.StudyInstanceUID == "1.2.3.4" and ds0.FrameOfReferenceUID == "1.2.3.4.6"
    assert float(ds0.RescaleIntercept) == -1024.0 and float(ds0.RescaleSlope) == 1.0
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    a = default_phantom.affine_lps
    expected_hu = np.clip(np.rint(default_phantom.hu), -1024, None)
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], (a @ [k, 0, 0, 1])[:3], atol=1e-3)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, expected_hu[k])
    np.testing.assert_allclose([float(v) for v in ds0.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose([float(v) for v in ds0.PixelSpacing], [a[1, 1], a[0, 2]])


def test_dicom_resampled_passes_dciodvfy(default_phantom: Phantom, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import RLELossless

    dciodvfy = require_tool("dciodvfy")
    paths = write_dicom_series(default_phantom, tmp_path, matrix=256, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[0])
    assert (ds.Rows, ds.Columns) == (256, 256)
    fov = default_phantom.hu.shape[2] * default_phantom.spacing_mm[2]
    assert float(ds.PixelSpacing[1]) * 256 == pytest.approx(fov)
    assert ds.pixel_array.shape == (256, 256)
    result = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "Error" not in report, report


def test_generate_dataset_with_follow_up(tmp_path: Path, table: LabelTable) -> None:
    dirs = generate_dataset(tmp_path, n_subjects=1, seed=4, spacing_mm=(6.0, 6.0, 6.0), follow_up=True, dicom=True)
    assert [d.name for d in dirs] == ["subject_000", "subject_000_fu"]
    index = json.loads((tmp_path / "dataset.json").read_text())
    assert [e["role"] for e in index] == ["baseline", "follow_up"]
    assert index[0]["patient_id"] == index[1]["patient_id"]
    assert index[0]["study_uid"] != index[1]["study_uid"]
    base = json.loads(Path(index[0]["truth_path"]).read_text())
    fu = json.loads(Path(index[1]["truth_path"]).read_text())
    atrophy = fu["params"]["atrophy"]
    assert 3 <= len(atrophy) <= 5
    for key, frac in atrophy.items():
        name, side = key.split(":")
        assert side == "right" and 0.75 <= frac <= 0.95
        ratio = fu["structures"][name]["right"]["voxel_count"] / base["structures"][name]["right"]["voxel_count"]
        assert ratio == pytest.approx(frac, abs=0.02)
        assert fu["structures"][name]["left"] == base["structures"][name]["left"]
    for d in dirs:
        assert (d / f"{d.name}_ct.nii.gz").is_file() and (d / f"{d.name}_label.nii.gz").is_file()
        assert len(list((d / "dicom").glob("*.dcm"))) > 10


def test_gracilis_is_one_continuous_strap_inside_the_leg(table: LabelTable) -> None:
    """The gracilis runs without a gap from the pubis to the knee and keeps a real cross-section
    in the thigh (it was once drawn medial of the leg outline: clipped to slivers there, and
    absent for ~14 mm just below the crotch)."""
    phantom = generate_phantom(PhantomParams(seed=5, spacing_mm=(2.0, 2.0, 2.0)), table)
    gid = table.by_key("gracilis").id
    z = _z_of_slices(phantom)
    voxel_mm2 = 2.0 * 2.0
    left = phantom.side_of_columns()
    for side_cols in (left, ~left):
        area = (phantom.labels[:, :, side_cols] == gid).sum(axis=(1, 2)) * voxel_mm2
        present = np.nonzero(area > 0)[0]
        assert present.size > 0
        gaps = np.nonzero(area[present[0] : present[-1] + 1] == 0)[0]
        assert gaps.size == 0, f"gracilis missing at z = {z[present[0] + gaps]} mm"
        # mid-thigh (between 40 % and 80 % of the way from crest to knee): a strap of >= 1.5 cm^2
        span = z.max() - z.min()
        mid = (z < z.max() - 0.4 * span) & (z > z.max() - 0.8 * span)
        assert area[mid].min() >= 150.0, area[mid].min()


@pytest.mark.parametrize(("seed", "sex", "height_m"), [(5, "F", 1.65), (7, "M", 1.85)])
def test_small_pelvic_muscles_are_not_drawn_into_neighbours(table: LabelTable, seed: int, sex: str, height_m: float) -> None:
    """The abdominal oblique, multifidus and obturator externus keep most of their drawn cross-section.
    They were once placed outside the muscle compartment (oblique, multifidus: clipped by the
    subcutaneous fat to 13-35 % of the drawn ellipses) or across the femoral head (obturator externus,
    a crescent: 63-75 %), leaving slivers that no model can measure to 5 %."""
    import modelkit.phantom_shapes as shapes

    params = PhantomParams(seed=seed, sex=sex, height_m=height_m, spacing_mm=(2.0, 2.0, 2.0))
    phantom = generate_phantom(params, table)
    z = _z_of_slices(phantom)
    subject = shapes.draw_subject(params, np.random.default_rng(params.seed))
    tracks = shapes.muscle_tracks(z, subject, shapes.Femur(subject))
    left = phantom.side_of_columns()
    for key in ("abdominal_oblique", "multifidus", "obturator_externus"):
        lid = table.by_key(key).id
        for track, cols, side in zip(tracks[key], (left, ~left), ("left", "right")):
            drawn_mm3 = sum(np.pi * track.a[k] * track.b[k] for k in range(z.size) if track.present[k]) * 2.0
            labelled_mm3 = float((phantom.labels[:, :, cols] == lid).sum()) * 8.0
            assert labelled_mm3 >= 0.7 * drawn_mm3, (key, side, labelled_mm3 / drawn_mm3)
