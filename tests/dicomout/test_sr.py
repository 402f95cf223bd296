"""TID 1500 SR builder: written, validated with dciodvfy, read back with highdicom and checked
against the input measurements and the SEG it references."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes as pydicom_codes

from dicomout import codes
from dicomout.seg import BuildError, build_seg, segment_map, structure_code
from dicomout.context import Equipment
from dicomout.sr import PATIENT_TOTALS_ID, build_sr
from dicomout.uids import SR_SERIES, device_observer_uid, output_uid
from pipeline.types import (
    FLAG_EMPTY,
    FLAG_METAL,
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    GroupMeasurement,
    Measurements,
    QualityFlag,
    SarcopeniaAssessment,
    SarcopeniaNotAssessed,
    Segmentation,
    StructureMeasurement,
    Volume,
)
from tests.dicomout.test_seg import EQUIPMENT, MODEL_NAME, MODEL_VERSION, make_case
from tests.support.dciodvfy import run_dciodvfy

HEIGHT_M = 1.68
DENSITY = 1.06  # g/cm3, the hand-made "mass = volume x density"
MISSING_KEY_SIDE = ("sartorius", "left")  # removed from the label map: measured but not found


def hand_made_measurements(volume: Volume, seg: Segmentation) -> Measurements:
    """Measurements computed by hand from the label map (what the measure stage would do)."""
    voxel_ml = volume.voxel_volume_ml
    structures = []
    flags = [QualityFlag(FLAG_METAL, "Metal artefact in the field of view", "", "")]
    for label in seg.labels.labels:
        for side_value, side in ((1, "right"), (2, "left")):
            mask = (seg.label_map == label.id) & (seg.side_map == side_value)
            n = int(mask.sum())
            if n == 0 and (label.key, side) != MISSING_KEY_SIDE:
                continue
            hu = volume.hu[mask]
            structure_flags: tuple[str, ...] = ()
            if n == 0:
                structure_flags = (FLAG_EMPTY,)
                flags.append(QualityFlag(FLAG_EMPTY, f"{label.name} not found on the {side}", label.key, side))
            elif label.id % 5 == 0:
                structure_flags = (FLAG_PARTIAL_TOP,)
                flags.append(QualityFlag(FLAG_PARTIAL_TOP, f"{label.name} cut at the top", label.key, side))
            structures.append(
                StructureMeasurement(
                    label_id=label.id,
                    key=label.key,
                    name=label.name,
                    group=label.group,
                    side=side,
                    voxel_count=n,
                    volume_ml=n * voxel_ml,
                    mean_hu=float(hu.mean()) if n else float("nan"),
                    std_hu=float(hu.std()) if n else float("nan"),
                    mass_g=n * voxel_ml * DENSITY,
                    fat_fraction=float(np.mean((hu >= -190) & (hu <= -30))) if n else float("nan"),
                    flags=structure_flags,
                )
            )
    groups = []
    for group, members in (
        (GROUP_GLUTEAL, {"gluteal"}),
        (GROUP_ABOVE_KNEE, {"anterior", "medial", "posterior"}),
        (GROUP_ALL, {"gluteal", "anterior", "medial", "posterior", "other"}),
    ):
        for side in ("right", "left", "both"):
            chosen = [
                s for s in structures if s.group in members and (side == "both" or s.side == side) and s.voxel_count
            ]
            volume_ml = sum(s.volume_ml for s in chosen)
            mass_g = sum(s.mass_g for s in chosen)
            groups.append(
                GroupMeasurement(
                    group=group,
                    side=side,
                    structure_keys=tuple(sorted({s.key for s in chosen})),
                    volume_ml=volume_ml,
                    mass_g=mass_g,
                    volume_per_height2_cm3_m2=volume_ml / HEIGHT_M**2,
                    smi_kg_m2=mass_g / 1000.0 / HEIGHT_M**2,
                    includes_partial=any(s.is_partial for s in chosen),
                )
            )
    smi_all = next(g for g in groups if g.group == GROUP_ALL and g.side == "both").smi_kg_m2
    return Measurements(
        structures=tuple(structures),
        groups=tuple(groups),
        flags=tuple(flags),
        height_m=HEIGHT_M,
        height_source="PatientSize",
        sex="F",
        density_formula=f"mass = volume x {DENSITY} g/cm3",
        sarcopenia=SarcopeniaAssessment(
            group=GROUP_ALL,
            smi_kg_m2=smi_all,
            threshold_kg_m2=0.05,
            below_threshold=smi_all < 0.05,
            calibrated_for_ct=False,
            source="AWGS 2014 (DXA appendicular SMI)",
        ),
        voxel_volume_ml=voxel_ml,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sr")
    paths, volume, seg = make_case(tmp, "HFS-reversed-files")
    missing = seg.labels.by_key(MISSING_KEY_SIDE[0]).id
    label_map = np.where((seg.label_map == missing) & (seg.side_map == 2), 0, seg.label_map)
    side_map = np.where(label_map == 0, 0, seg.side_map)
    seg = Segmentation(label_map, side_map, seg.labels, MODEL_NAME, MODEL_VERSION, volume.affine_lps)
    seg_ds = build_seg(volume, seg, paths, **EQUIPMENT)
    seg_path = tmp / "seg.dcm"
    seg_ds.save_as(seg_path)
    measurements = hand_made_measurements(volume, seg)
    sr = build_sr(measurements, seg_ds, paths, volume=volume, labels=seg.labels, equipment=Equipment(**EQUIPMENT))
    sr_path = tmp / "sr.dcm"
    sr.save_as(sr_path)
    return {
        "paths": paths,
        "volume": volume,
        "seg": seg,
        "seg_ds": seg_ds,
        "seg_path": seg_path,
        "measurements": measurements,
        "sr_path": sr_path,
    }


def read_report(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def one_value(group: hd.sr.templates.Template, name, derivation=None) -> float:
    found = [m for m in group.get_measurements(name=name) if derivation is None or m.derivation == derivation]
    assert len(found) == 1, f"{len(found)} measurements {name.meaning} / {derivation}"
    return float(found[0].value)


def test_sr_passes_dciodvfy(built: dict) -> None:
    report = run_dciodvfy(built["sr_path"])
    assert report.errors == (), report.output


def test_sr_header(built: dict) -> None:
    ds = pydicom.dcmread(built["sr_path"])
    volume = built["volume"]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.SOPInstanceUID == output_uid(volume.series_instance_uid, MODEL_VERSION, "sr.instance")
    assert ds.SeriesInstanceUID == output_uid(volume.series_instance_uid, MODEL_VERSION, "sr.series")
    assert (ds.SeriesNumber, ds.SeriesDescription) == (SR_SERIES.number, "Thigh muscles SR (thighnode demo 0.1.0)")
    assert ds.StudyInstanceUID == volume.study_instance_uid
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence] == [codes.PRIVATE_SCHEME]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for series in ds.CurrentRequestedProcedureEvidenceSequence
        for s in series.ReferencedSeriesSequence
        for ref in s.ReferencedSOPSequence
    }
    assert evidence == set(volume.sop_instance_uids) | {built["seg_ds"].SOPInstanceUID}


def test_observer_and_procedure(built: dict) -> None:
    report = read_report(built["sr_path"])
    (observer,) = report.get_observer_contexts(observer_type=pydicom_codes.DCM.Device)
    attrs = observer.observer_identifying_attributes
    assert attrs.uid == device_observer_uid("thighnode", EQUIPMENT["manufacturer"], EQUIPMENT["device_serial"])
    assert (attrs.name, attrs.manufacturer_name, attrs.model_name) == ("thighnode", EQUIPMENT["manufacturer"], MODEL_NAME)
    procedures = [
        item.value
        for item in report[0].ContentSequence
        if item.name == pydicom_codes.DCM.ProcedureReported
    ]
    assert procedures == [codes.CT_OF_THIGH]


def test_structure_groups_match_measurements_and_seg(built: dict) -> None:
    report = read_report(built["sr_path"])
    seg_ds, measurements, seg = built["seg_ds"], built["measurements"], built["seg"]
    smap = segment_map(seg_ds)
    seg_items = {int(i.SegmentNumber): i for i in seg_ds.SegmentSequence}
    groups = report.get_volumetric_roi_measurement_groups()
    expected = [s for s in measurements.structures if s.voxel_count]
    assert len(groups) == len(expected) == len(smap)
    seen = set()
    for g in groups:
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg_ds.SOPClassUID
        (number,) = ref.referenced_segment_numbers
        item = seg_items[number]
        assert g.tracking_uid == item.TrackingUID
        assert g.tracking_identifier == item.TrackingID
        key, side = next(ks for ks, n in smap.items() if n == number)
        s = measurements.structure(key, side)
        assert s is not None
        assert g.finding_type == structure_code(seg.labels.by_key(key))
        (site,) = g.finding_sites
        assert site.laterality == {"right": codes.RIGHT, "left": codes.LEFT}[side]
        assert one_value(g, codes.VOLUME) == pytest.approx(s.volume_ml, rel=1e-9)
        assert one_value(g, codes.ATTENUATION_COEFFICIENT, codes.MEAN) == pytest.approx(s.mean_hu, rel=1e-9)
        assert one_value(g, codes.ATTENUATION_COEFFICIENT, codes.STANDARD_DEVIATION) == pytest.approx(s.std_hu, rel=1e-9)
        assert one_value(g, codes.MASS) == pytest.approx(s.mass_g, rel=1e-9)
        assert one_value(g, codes.FAT_FRACTION) == pytest.approx(100 * s.fat_fraction, rel=1e-9, abs=1e-12)
        evaluations = g.get_qualitative_evaluations(name=codes.QUALITY_CONTROL)
        assert [e.value for e in evaluations] == [codes.flag_code(f) for f in s.flags]
        seen.add((key, side))
    assert seen == set(smap)


def test_sr_volume_equals_seg_voxels(built: dict) -> None:
    """Volume in the SR = number of segment pixels in the SEG read back x the SEG's voxel volume."""
    report = read_report(built["sr_path"])
    seg_read = hd.seg.segread(built["seg_path"])
    measures = seg_read.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_ml = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1]) * float(measures.SliceThickness) / 1000
    np.testing.assert_allclose(voxel_ml, built["volume"].voxel_volume_ml, rtol=1e-6)
    for g in report.get_volumetric_roi_measurement_groups():
        (number,) = g.referenced_segment.referenced_segment_numbers
        pixels = seg_read.get_pixels_by_source_instance(
            source_sop_instance_uids=list(built["volume"].sop_instance_uids), segment_numbers=[number]
        )
        assert one_value(g, codes.VOLUME) == pytest.approx(int(pixels.sum()) * voxel_ml, rel=1e-6)


def test_patient_totals_and_flags(built: dict) -> None:
    report = read_report(built["sr_path"])
    measurements = built["measurements"]
    groups = report.get_image_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    totals = by_id[PATIENT_TOTALS_ID]

    def values(name) -> dict[tuple[str, str], float]:
        out = {}
        for m in totals.get_measurements(name=name):
            (site,) = m.finding_sites
            group = next(k for k, c in codes.GROUP_CODES.items() if c == site.value)
            side = {codes.RIGHT: "right", codes.LEFT: "left", codes.RIGHT_AND_LEFT: "both"}[site.laterality]
            out[(group, side)] = float(m.value)
        return out

    volumes, masses = values(codes.VOLUME), values(codes.MASS)
    per_h2, smi = values(codes.VOLUME_PER_HEIGHT2), values(codes.SKELETAL_MUSCLE_INDEX)
    assert len(volumes) == len(masses) == len(per_h2) == len(smi) == 9
    for g in measurements.groups:
        assert volumes[(g.group, g.side)] == pytest.approx(g.volume_ml, rel=1e-9)
        assert masses[(g.group, g.side)] == pytest.approx(g.mass_g, rel=1e-9)
        assert per_h2[(g.group, g.side)] == pytest.approx(g.volume_per_height2_cm3_m2, rel=1e-9)
        assert smi[(g.group, g.side)] == pytest.approx(g.smi_kg_m2, rel=1e-9)
    assert one_value(totals, codes.BODY_HEIGHT) == pytest.approx(HEIGHT_M)
    assert one_value(totals, codes.SMI_THRESHOLD) == pytest.approx(0.05)
    (below,) = totals.get_qualitative_evaluations(name=codes.SMI_BELOW_THRESHOLD)
    assert below.value == (codes.YES if measurements.sarcopenia.below_threshold else codes.NO)
    (study_flag,) = totals.get_qualitative_evaluations(name=codes.QUALITY_CONTROL)
    assert study_flag.value == codes.flag_code(FLAG_METAL)
    texts = {
        (item.name.meaning, item.value)
        for item in totals[0].ContentSequence
        if item.value_type == hd.sr.ValueTypeValues.TEXT
    }
    assert (codes.THRESHOLD_CALIBRATION.meaning, "Threshold NOT calibrated for CT: AWGS 2014 (DXA appendicular SMI); "
            "interpret the comparison with caution") in texts
    assert (codes.COMMENT.meaning, "Metal artefact in the field of view") in texts

    # The structure measured but not found has its own group with its flag, and no segment.
    missing = by_id[" ".join(MISSING_KEY_SIDE)]
    (flag,) = missing.get_qualitative_evaluations(name=codes.QUALITY_CONTROL)
    assert flag.value == codes.flag_code(FLAG_EMPTY)
    assert missing.get_measurements() == []


def test_prior_of_wrong_type_is_refused(built: dict) -> None:
    """Only a pipeline.types.Comparison is accepted as ``prior`` (the comparison itself: test_sr_comparison)."""
    with pytest.raises(BuildError, match="prior comparison"):
        build_sr(
            built["measurements"],
            built["seg_ds"],
            built["paths"],
            volume=built["volume"],
            labels=built["seg"].labels,
            prior=object(),
            equipment=Equipment(**EQUIPMENT),
        )


def test_withheld_group_has_no_numeric_and_carries_its_reason(built: dict, tmp_path: Path) -> None:
    """A hip CT: "above knee" and "all" not covered by the field of view -> no value, the reason as text."""
    m: Measurements = built["measurements"]
    reason = "not reported: vastus lateralis right, rectus femoris right cut at the inferior edge of the field of view"
    groups = tuple(
        dataclasses.replace(
            g, volume_ml=None, mass_g=None, volume_per_height2_cm3_m2=None, smi_kg_m2=None, withheld_reason=reason
        )
        if g.group in (GROUP_ABOVE_KNEE, GROUP_ALL)
        else g
        for g in m.groups
    )
    glut = next(g for g in groups if g.group == GROUP_GLUTEAL and g.side == "both")
    hip = dataclasses.replace(
        m,
        groups=groups,
        sarcopenia=None,
        sarcopenia_not_assessed=SarcopeniaNotAssessed(
            group=GROUP_ALL,
            reason="not assessed: all muscles not fully in the field of view",
            measured_group=GROUP_GLUTEAL,
            measured_smi_kg_m2=glut.smi_kg_m2,
        ),
    )
    sr = build_sr(
        hip, built["seg_ds"], built["paths"], volume=built["volume"], labels=built["seg"].labels,
        equipment=Equipment(**EQUIPMENT),
    )
    path = tmp_path / "sr_hip.dcm"
    sr.save_as(path)
    validation = run_dciodvfy(path)
    assert validation.errors == (), validation.output
    totals = {g.tracking_identifier: g for g in read_report(path).get_image_measurement_groups()}[PATIENT_TOTALS_ID]
    sites = {
        next(k for k, c in codes.GROUP_CODES.items() if c == m.finding_sites[0].value)
        for m in totals.get_measurements()
        if m.finding_sites
    }
    assert sites == {GROUP_GLUTEAL}  # no volume, mass, vol/h² or SMI of a withheld group
    assert len(totals.get_measurements(name=codes.SKELETAL_MUSCLE_INDEX)) == 3  # gluteal right, left, both
    assert totals.get_measurements(name=codes.SMI_THRESHOLD) == []  # no threshold for the gluteal group
    not_reported = totals.get_qualitative_evaluations(name=codes.GROUP_NOT_REPORTED)
    assert {e.value for e in not_reported} == {codes.GROUP_CODES[GROUP_ABOVE_KNEE], codes.GROUP_CODES[GROUP_ALL]}
    texts = [(i.name.meaning, i.value) for i in totals[0].ContentSequence if i.value_type == hd.sr.ValueTypeValues.TEXT]
    assert (codes.COMMENT.meaning, f"All measured muscles (both): {reason}") in texts
    assert (codes.COMMENT.meaning, f"Thigh muscles above the knee (right): {reason}") in texts
    screen = [v for name, v in texts if name == codes.SARCOPENIA_SCREEN.meaning]
    assert screen == [
        "not assessed: all muscles not fully in the field of view; measured: Gluteal muscles "
        f"SMI {glut.smi_kg_m2:.2f} kg/m² (both sides), no threshold applied (none configured for that group)"
    ]
    assert not any("lower bounds" in v and "All measured" in v for _, v in texts)


def test_site_threshold_for_the_measured_group_is_written_with_its_site(built: dict, tmp_path: Path) -> None:
    m: Measurements = built["measurements"]
    groups = tuple(
        dataclasses.replace(g, volume_ml=None, mass_g=None, volume_per_height2_cm3_m2=None, smi_kg_m2=None,
                            withheld_reason="not reported: gracilis left not in the field of view")
        if g.group == GROUP_ALL else g
        for g in m.groups
    )
    glut = next(g for g in groups if g.group == GROUP_GLUTEAL and g.side == "both")
    assert glut.smi_kg_m2 is not None
    hip = dataclasses.replace(
        m, groups=groups,
        sarcopenia=SarcopeniaAssessment(GROUP_GLUTEAL, glut.smi_kg_m2, 0.01, False, True, "site gluteal cut-off"),
        sarcopenia_not_assessed=SarcopeniaNotAssessed(
            GROUP_ALL, "not assessed: all muscles not fully in the field of view", GROUP_GLUTEAL, glut.smi_kg_m2, True
        ),
    )
    sr = build_sr(hip, built["seg_ds"], built["paths"], volume=built["volume"], labels=built["seg"].labels,
                  equipment=Equipment(**EQUIPMENT))
    path = tmp_path / "sr_site.dcm"
    sr.save_as(path)
    assert run_dciodvfy(path).errors == ()
    totals = {g.tracking_identifier: g for g in read_report(path).get_image_measurement_groups()}[PATIENT_TOTALS_ID]
    (threshold,) = totals.get_measurements(name=codes.SMI_THRESHOLD)
    assert threshold.finding_sites[0].value == codes.GROUP_CODES[GROUP_GLUTEAL]
    texts = {i.value for i in totals[0].ContentSequence if i.value_type == hd.sr.ValueTypeValues.TEXT}
    assert "Threshold calibrated for CT (site gluteal cut-off)" in texts
    assert any(t.endswith("screened with the site's threshold for that group") for t in texts)


WEIGHTS_SHA256 = "d3b77cb0a4f0b2ba9c2d5d34e3f529ee4011cea347ddac93b7889406548acf3b"


def _text_items(ds: pydicom.Dataset, code_value: str) -> list[str]:
    """TextValue of every TEXT content item named ``code_value`` (DCM), anywhere in the content tree."""
    found: list[str] = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == code_value and item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(_text_items(item, code_value))
    return found


def test_seg_and_sr_name_the_model_weights_sha256(built: dict, tmp_path: Path) -> None:
    """The exact model: the SEG's algorithm carries weights_sha256 in AlgorithmParameters, the SR repeats it
    as the algorithm's TEXT "Algorithm Parameters" (DCM 111002) in every measurement group; the UIDs stay
    those of the model version (deterministic, unchanged by the digest)."""
    seg = dataclasses.replace(built["seg"], model_sha256=WEIGHTS_SHA256)
    seg_ds = build_seg(built["volume"], seg, built["paths"], **EQUIPMENT)
    algo = seg_ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmParameters == f"weights_sha256={WEIGHTS_SHA256}"
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == (MODEL_NAME, MODEL_VERSION)
    assert seg_ds.SOPInstanceUID == built["seg_ds"].SOPInstanceUID

    sr = build_sr(built["measurements"], seg_ds, built["paths"], volume=built["volume"], labels=seg.labels,
                  equipment=Equipment(**EQUIPMENT))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    back = pydicom.dcmread(path)
    parameters = _text_items(back, "111002")
    groups = read_report(path).get_volumetric_roi_measurement_groups()
    assert len(parameters) >= len(groups) > 0
    assert set(parameters) == {f"weights_sha256={WEIGHTS_SHA256}"}
    report = run_dciodvfy(path)
    assert report.errors == (), report.output
    assert back.SOPInstanceUID == pydicom.dcmread(built["sr_path"]).SOPInstanceUID
    assert back.SeriesInstanceUID == pydicom.dcmread(built["sr_path"]).SeriesInstanceUID
    # without a digest (a segmentation of unknown weights) nothing is invented
    assert _text_items(pydicom.dcmread(built["sr_path"]), "111002") == []
    assert "AlgorithmParameters" not in built["seg_ds"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
