"""The PDF report: content (text extracted with poppler's pdftotext), determinism, and
the orientation of the pictures (patient right on the image left, from the affine)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomout.report import (
    DEMONSTRATION_BANNER,
    ReportError,
    ReportHeader,
    axial_overlay_rgb,
    coronal_overlay_rgb,
    render_report,
)
from pipeline.labels import LabelTable, load_label_table
from pipeline.types import (
    FLAG_IMPLAUSIBLE_VOLUME,
    FLAG_METAL,
    FLAG_PARTIAL_TOP,
    GroupMeasurement,
    Measurements,
    PatientInfo,
    QualityFlag,
    SarcopeniaAssessment,
    SarcopeniaNotAssessed,
    Segmentation,
    StructureMeasurement,
    Volume,
)
from tests.conftest import require_tool
from tests.support.synthetic_ct import write_ct_series

SHAPE = (40, 64, 64)
SPACING = (2.5, 0.8, 0.8)  # (k, r, c) mm


def _affine(*, flip_columns: bool = False, flip_rows: bool = False, flip_slices: bool = False) -> np.ndarray:
    """Axial (k, r, c) -> LPS; HFS-like by default (c toward the patient's left, r toward
    posterior, k toward superior), each axis optionally reversed, grid centred on 0."""
    dk, dr, dc = SPACING
    nk, nr, nc = SHAPE
    sk, sr, sc = (-1.0 if f else 1.0 for f in (flip_slices, flip_rows, flip_columns))
    a = np.zeros((4, 4))
    a[:3, 0] = (0.0, 0.0, sk * dk)
    a[:3, 1] = (0.0, sr * dr, 0.0)
    a[:3, 2] = (sc * dc, 0.0, 0.0)
    a[:3, 3] = (-sc * dc * (nc - 1) / 2, -sr * dr * (nr - 1) / 2, -sk * dk * (nk - 1) / 2)
    a[3, 3] = 1.0
    return a


def _lps_grid(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, r, c = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    pts = np.stack([k, r, c, np.ones_like(k)], axis=-1).astype(float) @ affine.T
    return pts[..., 0], pts[..., 1], pts[..., 2]


def _volume(affine: np.ndarray) -> Volume:
    x, y, _ = _lps_grid(affine)
    hu = np.where(np.hypot(x / 24.0, y / 20.0) <= 1.0, 50.0, -1000.0).astype(np.float32)
    return Volume(
        hu=hu,
        affine_lps=affine,
        frame_of_reference_uid="1.2.3.1",
        study_instance_uid="1.2.3.2",
        series_instance_uid="1.2.3.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uids=(),
    )


def _segmentation(affine: np.ndarray, labels: LabelTable, where: str = "both") -> Segmentation:
    """Blocks of vastus lateralis and rectus femoris in the lower half (z < 0) and gluteus
    maximus in the upper half, on the patient's right (x < 0) and/or left (x > 0)."""
    x, y, z = _lps_grid(affine)
    body = np.hypot(x / 24.0, y / 20.0) <= 1.0
    sides = {"right": x < -3.0, "left": x > 3.0, "both": np.abs(x) > 3.0}[where]
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[body & sides & (z < 0) & (y < 0)] = labels.by_key("rectus_femoris").id
    lab[body & sides & (z < 0) & (y >= 0)] = labels.by_key("vastus_lateralis").id
    lab[body & sides & (z >= 10)] = labels.by_key("gluteus_maximus").id
    side = np.where(lab > 0, np.where(x > 0, 2, 1), 0).astype(np.uint8)
    return Segmentation(lab, side, labels, "thighnode-unetr", "0.1.0-demo", affine)


def _structure(labels: LabelTable, key: str, side: str, volume: float, hu: float, flags: tuple[str, ...] = ()) -> StructureMeasurement:
    label = labels.by_key(key)
    return StructureMeasurement(
        label_id=label.id, key=key, name=label.name, group=label.group, side=side,
        voxel_count=int(volume * 625), volume_ml=volume, mean_hu=hu, std_hu=20.0,
        mass_g=volume * (1.0 + hu / 1000.0), fat_fraction=0.042, flags=flags,
    )


def _measurements(labels: LabelTable) -> Measurements:
    structures = (
        _structure(labels, "rectus_femoris", "right", 211.3, 41.0),
        _structure(labels, "rectus_femoris", "left", 187.9, 44.0, (FLAG_PARTIAL_TOP,)),
        _structure(labels, "vastus_lateralis", "right", 612.4, 47.0),
        _structure(labels, "vastus_lateralis", "left", 598.6, 46.0, (FLAG_IMPLAUSIBLE_VOLUME,)),
        _structure(labels, "gluteus_maximus", "right", 734.2, 22.0, (FLAG_METAL,)),
        _structure(labels, "gluteus_maximus", "left", 741.8, 39.0),
    )
    groups = (
        GroupMeasurement("gluteal", "right", ("gluteus_maximus",), 734.2, 750.4, 269.7, 0.28, False),
        GroupMeasurement("gluteal", "left", ("gluteus_maximus",), 741.8, 770.7, 272.5, 0.28, False),
        GroupMeasurement("gluteal", "both", ("gluteus_maximus",), 1476.0, 1521.1, 542.1, 0.56, False),
        GroupMeasurement("above_knee", "both", ("rectus_femoris", "vastus_lateralis"), 1610.2, 1680.3, 591.4, 0.62, True),
        GroupMeasurement("all", "both", ("rectus_femoris", "vastus_lateralis", "gluteus_maximus"), 3086.2, 3201.4, 1133.6, 4.37, True),
    )
    flags = (
        QualityFlag(FLAG_PARTIAL_TOP, "Rectus femoris is cut by the top of the scan", "rectus_femoris", "left"),
        QualityFlag(FLAG_METAL, "Metal within 20 mm of the structure", "gluteus_maximus", "right"),
        QualityFlag(FLAG_IMPLAUSIBLE_VOLUME, "Volume outside the plausible range", "vastus_lateralis", "left"),
    )
    sarcopenia = SarcopeniaAssessment(
        group="all", smi_kg_m2=4.37, threshold_kg_m2=5.40, below_threshold=True,
        calibrated_for_ct=False, source="AWGS 2014 DXA cut-off (site default)",
    )
    return Measurements(
        structures=structures, groups=groups, flags=flags, height_m=1.65, height_source="PatientSize",
        sex="F", density_formula="density = 1.0 + 0.001 x mean HU g/cm³", sarcopenia=sarcopenia,
        voxel_volume_ml=0.0016,
    )


PATIENT = PatientInfo(
    patient_id="TN-RPT-4711", patient_name="Doe^Jane", birth_date="19591102", sex="F", age="064Y",
    height_m=1.65, weight_kg=61.0,
)


def _header(demo: bool) -> ReportHeader:
    return ReportHeader(
        study_date="20240315", accession_number="ACC-99812", study_description="CT BOTH THIGHS",
        institution_name="Test Hospital", referring_physician="House^Gregory", node_version="0.3.0",
        model_name="thighnode-unetr", model_version="0.1.0-demo", demonstration_model=demo,
    )


@pytest.fixture(scope="module")
def labels() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def report_inputs(labels: LabelTable) -> tuple[Volume, Segmentation, Measurements]:
    affine = _affine()
    return _volume(affine), _segmentation(affine, labels), _measurements(labels)


@pytest.fixture(scope="module")
def demo_pdf(report_inputs: tuple[Volume, Segmentation, Measurements]) -> bytes:
    volume, seg, meas = report_inputs
    return render_report(volume, seg, meas, PATIENT, study=_header(True))


def _pdf_text(pdf: bytes, tmp_path: Path) -> str:
    tool = require_tool("pdftotext")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    result = subprocess.run([tool, "-layout", "-enc", "UTF-8", str(path), "-"], capture_output=True, check=True)
    return result.stdout.decode("utf-8")


def test_report_is_a_pdf_with_patient_table_flags_and_smi(demo_pdf: bytes, tmp_path: Path) -> None:
    assert demo_pdf.startswith(b"%PDF-")
    text = _pdf_text(demo_pdf, tmp_path)
    # identification on every page
    assert text.count("TN-RPT-4711") == text.count("Page ") >= 3
    for expected in ("Doe, Jane", "1959-11-02", "female", "1.65 m (DICOM PatientSize)", "2024-03-15", "ACC-99812",
                     "CT BOTH THIGHS", "thighnode-unetr 0.1.0-demo", "thighnode 0.3.0"):
        assert expected in text, expected
    assert text.count(DEMONSTRATION_BANNER) == text.count("Page ")
    # structure table: names and values, partial marked as a lower bound
    for expected in ("Rectus femoris", "Vastus lateralis", "Gluteus maximus", "211.3", "≥187.9", "612.4", "598.6",
                     "734.2", "741.8", "1476.0"):
        assert expected in text, expected
    # flags in the table and in words
    for expected in ("partial (top)", "metal", "implausible", "Rectus femoris is cut by the top of the scan",
                     "Metal within 20 mm of the structure", "Volume outside the plausible range"):
        assert expected in text, expected
    # group totals and the sarcopenia screen with its threshold, source and caveat
    for expected in ("Gluteal", "Above knee (thigh)", "All (gluteal + thigh)", "1134", "3086.2", "≥3201", "4.37", "5.40",
                     "AWGS 2014 DXA cut-off (site default)", "NOT calibrated for CT", "BELOW threshold"):
        assert expected in text, expected
    assert "Comparison with prior study" in text


def test_no_banner_without_demonstration_flag(report_inputs: tuple[Volume, Segmentation, Measurements], tmp_path: Path) -> None:
    volume, seg, meas = report_inputs
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=_header(False)), tmp_path)
    assert "TN-RPT-4711" in text
    assert "NOT FOR CLINICAL USE" not in text


def test_identical_inputs_give_identical_bytes(
    report_inputs: tuple[Volume, Segmentation, Measurements], demo_pdf: bytes
) -> None:
    volume, seg, meas = report_inputs
    again = render_report(volume, seg, meas, PATIENT, study=_header(True))
    assert again == demo_pdf
    assert b"/CreationDate" not in again


def test_comparison_of_wrong_type_is_refused(report_inputs: tuple[Volume, Segmentation, Measurements]) -> None:
    """Only a pipeline.types.Comparison is drawn (the comparison pages: test_report_comparison)."""
    volume, seg, meas = report_inputs
    with pytest.raises(ReportError, match="comparison is a object"):
        render_report(volume, seg, meas, PATIENT, study=_header(False), comparison=object())


def test_no_comparison_is_stated(report_inputs: tuple[Volume, Segmentation, Measurements], tmp_path: Path) -> None:
    volume, seg, meas = report_inputs
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=_header(False)), tmp_path)
    assert "No prior study was compared in this report." in text


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (the CT is grey; the overlay tints)."""
    rgb = rgb.astype(int)
    return (np.abs(rgb[..., 0] - rgb[..., 1]) > 4) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 4)


@pytest.mark.parametrize(
    "flips",
    [{}, {"flip_columns": True}, {"flip_rows": True}, {"flip_slices": True}, {"flip_columns": True, "flip_slices": True}],
    ids=["hfs", "columns-flipped", "rows-flipped", "slices-flipped", "columns-and-slices-flipped"],
)
def test_patient_left_is_drawn_on_the_image_right(labels: LabelTable, flips: dict[str, bool]) -> None:
    affine = _affine(**flips)
    volume, seg = _volume(affine), _segmentation(affine, labels, where="left")
    for image in (axial_overlay_rgb(volume, seg), coronal_overlay_rgb(volume, seg)):
        coloured = _coloured(image.rgb)
        assert coloured.sum() > 20, image.plane
        half = image.rgb.shape[1] // 2
        assert not coloured[:, :half].any(), f"{image.plane}: overlay on the image left (patient right)"
        assert coloured[:, half:].any(), image.plane


@pytest.mark.parametrize("flips", [{}, {"flip_rows": True}, {"flip_slices": True}], ids=["hfs", "rows-flipped", "slices-flipped"])
def test_anterior_is_up_on_axial_and_superior_up_on_coronal(labels: LabelTable, flips: dict[str, bool]) -> None:
    affine = _affine(**flips)
    x, y, z = _lps_grid(affine)
    lab = np.where((y > -8.0) & (y < -2.0) & (np.abs(x) < 20.0) & (z < 0), labels.by_key("rectus_femoris").id, 0).astype(np.uint8)
    lab[(z > 20.0) & (np.abs(x) < 20.0)] = labels.by_key("gluteus_maximus").id
    seg = Segmentation(lab, np.where(lab > 0, np.where(x > 0, 2, 1), 0).astype(np.uint8), labels, "m", "1", affine)
    volume = _volume(affine)
    axial = _coloured(axial_overlay_rgb(volume, seg).rgb)
    assert axial[: axial.shape[0] // 2].any() and not axial[axial.shape[0] // 2 + 1:].any()
    coronal_image = coronal_overlay_rgb(volume, seg, level=10)  # an anterior plane: only the z > 20 block
    coronal = _coloured(coronal_image.rgb)
    assert coronal[: coronal.shape[0] // 2].any() and not coronal[coronal.shape[0] // 2:].any()
    # the coronal reformat keeps the physical aspect (slices 2.5 mm, pixels 0.8 mm)
    assert coronal_image.height_mm == pytest.approx(SHAPE[0] * SPACING[0])
    assert coronal_image.width_mm == pytest.approx(SHAPE[2] * SPACING[2])


def test_axial_level_is_the_largest_thigh_muscle_area(labels: LabelTable) -> None:
    affine = _affine()
    x, y, z = _lps_grid(affine)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[(np.hypot(x, y) < 8.0)] = labels.by_key("vastus_lateralis").id
    lab[7][np.hypot(x[7], y[7]) < 15.0] = labels.by_key("vastus_lateralis").id  # widest at k = 7
    seg = Segmentation(lab, np.zeros_like(lab), labels, "m", "1", affine)
    image = axial_overlay_rgb(_volume(affine), seg)
    assert image.level == 7
    assert image.position_mm == pytest.approx(affine[2, 0] * 7 + affine[2, 3])


def test_mismatched_grid_is_refused(labels: LabelTable, report_inputs: tuple[Volume, Segmentation, Measurements]) -> None:
    volume, _, meas = report_inputs
    small = np.zeros((4, 4, 4), dtype=np.uint8)
    seg = Segmentation(small, small, labels, "m", "1")
    with pytest.raises(ReportError, match=r"label_map shape \(4, 4, 4\) differs"):
        render_report(volume, seg, meas, PATIENT, study=_header(False))


def test_header_from_source_dataset(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "ct", n_slices=1)[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    header = ReportHeader.from_dataset(ds, node_version="0.3.0", model_name="m", model_version="1", demonstration_model=True)
    assert header == ReportHeader(
        study_date="20240315", study_time="101500", accession_number="ACC0001", study_description="CT THIGHS",
        institution_name="Test Hospital", referring_physician="Referrer^Test", node_version="0.3.0",
        model_name="m", model_version="1", demonstration_model=True,
    )


def test_withheld_groups_say_not_reported_with_the_reason(
    report_inputs: tuple[Volume, Segmentation, Measurements], tmp_path: Path
) -> None:
    """A hip CT: above knee and all withheld (thigh muscles cut), the gluteal group reported and named
    by the sarcopenia screen without a threshold."""
    volume, seg, meas = report_inputs
    reason = "not reported: rectus femoris right, vastus lateralis right cut at the inferior edge of the field of view"
    groups = tuple(
        dataclasses.replace(g, volume_ml=None, mass_g=None, volume_per_height2_cm3_m2=None, smi_kg_m2=None,
                            withheld_reason=reason)
        if g.group in ("above_knee", "all") else g
        for g in meas.groups
    )
    hip = dataclasses.replace(
        meas, groups=groups, sarcopenia=None,
        sarcopenia_not_assessed=SarcopeniaNotAssessed(
            group="all", reason="not assessed: all muscles not fully in the field of view",
            measured_group="gluteal", measured_smi_kg_m2=0.56,
        ),
    )
    text = _pdf_text(render_report(volume, seg, hip, PATIENT, study=_header(False)), tmp_path)
    flat = " ".join(text.split())
    assert text.count("not reported") >= 4  # two rows and two reasons
    for absent in ("3086.2", "1610.2", "4.37", "BELOW threshold"):
        assert absent not in text, absent
    assert "1476.0" in text and "0.56" in text  # the gluteal group is reported
    assert "vastus lateralis right cut at the inferior edge of the field of view" in flat
    assert "Sarcopenia screen: not assessed: all muscles not fully in the field of view." in flat
    assert "no threshold is applied to it" in flat and "[sarcopenia.group_thresholds.gluteal]" in flat


def test_model_row_names_the_weights_sha256(report_inputs: tuple[Volume, Segmentation, Measurements],
                                            tmp_path: Path) -> None:
    """Every page names the model version and the first 12 hex digits of its weights' sha256, from the header
    or, when the header has none, from the segmentation."""
    volume, seg, meas = report_inputs
    sha = "0123456789abcdef" * 4
    header = dataclasses.replace(_header(False), model_sha256=sha)
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=header), tmp_path)
    assert text.count("thighnode-unetr 0.1.0-demo sha256 0123456789ab") == text.count("Page ") >= 3
    assert "thighnode 0.3.0" in text
    from_seg = dataclasses.replace(seg, model_sha256="fedcba9876543210" * 4)
    text = _pdf_text(render_report(volume, from_seg, meas, PATIENT, study=_header(False)), tmp_path)
    assert text.count("sha256 fedcba987654") == text.count("Page ")
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=_header(False)), tmp_path)
    assert "sha256" not in text
