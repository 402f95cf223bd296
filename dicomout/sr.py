"""TID 1500 Measurement Report of the thigh and hip muscles (Comprehensive 3D SR, PS3.3 A.35.13).

:func:`build_sr` writes the measurements of one segmented study as a highdicom
:class:`highdicom.sr.Comprehensive3DSR` whose content tree is a TID 1500 "Imaging
Measurement Report" (PS3.16 TID 1500):

* observation context (TID 1001 / 1002 / 1004): the node as a *device* observer, with a
  deterministic Device Observer UID, name "thighnode", manufacturer, the model name as
  model name and the serial number; the software versions are in the General Equipment
  module (SoftwareVersions);
* procedure reported: SCT 241572009 "Computed tomography of thigh";
* one TID 1411 "Volumetric ROI Measurements and Qualitative Evaluations" group per
  structure and side (StructureMeasurement with side "right" or "left") that has a segment
  in the SEG: tracking identifier and tracking UID equal to the segment's TrackingID /
  TrackingUID; the segment referenced (TID 1411 row "Referenced Segment": SEG
  SOPInstanceUID and segment number, with the source series); finding = the structure's
  SNOMED CT code, finding site = the same with its laterality (CID 244); the model as
  algorithm identification (TID 4019); measurements (TID 300): volume (cm3, method "sum of
  segmented voxels"), mean and standard deviation of attenuation (HU), mass (g), fat
  fraction (%); quality flags as qualitative evaluations "Quality Control" = flag code, each
  followed by its message as a TEXT "Comment";
* a TID 1501 "Measurements and Qualitative Evaluations" group per structure and side that
  was measured but has no segment (not found), with its flags;
* a TID 1501 patient-level group, tracking identifier "patient totals": per muscle group
  (gluteal, above knee, all) and side, volume, mass, volume / height² and skeletal muscle
  index (mass / height²), each with the group and side as finding site; the body height
  used; the sarcopenia assessment (SMI threshold, below-threshold yes/no, and whether the
  threshold is calibrated for CT as text); the study-level quality flags.

Coded concepts are in :mod:`dicomout.codes`; private ones use the coding scheme
"99THIGHNODE", declared in CodingSchemeIdentificationSequence.

Longitudinal comparison (``prior``): not implemented yet. It will add, per structure
group, a TID 1502 Time Point Context and, in the patient group, derived measurements of
the change against the prior study (TID 1500 row "Derived imaging measurements"), and the
prior SR in the evidence (PertinentOtherEvidenceSequence). Until then a ``prior`` is refused.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code

from dicomout import codes
from dicomout.seg import BuildError, SourceInput, order_sources, segment_map, structure_code
from dicomout.uids import SR_SERIES, device_observer_uid, output_uid, tracking_uid
from pipeline.errors import LabelTableError
from pipeline.labels import LabelTable
from pipeline.types import GroupMeasurement, Measurements, QualityFlag, SIDE_BOTH, StructureMeasurement, Volume

logger = logging.getLogger(__name__)

DEVICE_OBSERVER_NAME = "thighnode"
PATIENT_TOTALS_ID = "patient totals"
"""Tracking Identifier of the patient-level measurement group."""

_GROUP_SIDES = ("right", "left", SIDE_BOTH)


def _num(
    name: Code,
    value: float | None,
    unit: Code,
    *,
    what: str,
    derivation: Code | None = None,
    method: Code | None = None,
    finding_sites: Sequence[hd.sr.FindingSite] | None = None,
    algorithm: hd.sr.AlgorithmIdentification | None = None,
) -> list[hd.sr.Measurement]:
    """A TID 300 measurement, or nothing when the value is missing or not finite (logged)."""
    if value is None or not math.isfinite(float(value)):
        logger.warning("SR: %s %s is %r; measurement left out", what, name.meaning, value)
        return []
    return [
        hd.sr.Measurement(
            name=name,
            value=float(value),
            unit=unit,
            derivation=derivation,
            method=method,
            finding_sites=finding_sites,
            algorithm_id=algorithm,
        )
    ]


def _add_texts(group: hd.sr.templates.Template, texts: Sequence[tuple[Code, str]]) -> None:
    """Append TEXT content items (CONTAINS) to a measurement group's container."""
    container = group[0]
    for name, value in texts:
        if value:
            container.ContentSequence.append(
                hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            )


def _flag_messages(flags: Sequence[QualityFlag], code: str, structure: str, side: str) -> list[str]:
    return [
        f.message
        for f in flags
        if f.code == code and f.structure == structure and f.side in (side, SIDE_BOTH, "") and f.message
    ]


def _structure_evaluations(
    s: StructureMeasurement, flags: Sequence[QualityFlag]
) -> tuple[list[hd.sr.QualitativeEvaluation], list[tuple[Code, str]]]:
    evaluations = [hd.sr.QualitativeEvaluation(codes.QUALITY_CONTROL, codes.flag_code(f)) for f in s.flags]
    texts = [(codes.COMMENT, msg) for f in s.flags for msg in _flag_messages(flags, f, s.key, s.side)]
    return evaluations, texts


def _structure_measurements(s: StructureMeasurement) -> list[hd.sr.Measurement]:
    what = f"{s.key} {s.side}"
    return [
        *_num(codes.VOLUME, s.volume_ml, codes.UNIT_CM3, what=what, method=codes.SUM_OF_SEGMENTED_VOXELS),
        *_num(codes.ATTENUATION_COEFFICIENT, s.mean_hu, codes.UNIT_HU, what=what, derivation=codes.MEAN),
        *_num(
            codes.ATTENUATION_COEFFICIENT, s.std_hu, codes.UNIT_HU, what=what, derivation=codes.STANDARD_DEVIATION
        ),
        *_num(codes.MASS, s.mass_g, codes.UNIT_G, what=what),
        *_num(codes.FAT_FRACTION, 100.0 * s.fat_fraction, codes.UNIT_PERCENT, what=what),
    ]


def _group_measurements(g: GroupMeasurement) -> list[hd.sr.Measurement]:
    site = [hd.sr.FindingSite(anatomic_location=codes.GROUP_CODES[g.group], laterality=codes.laterality(g.side))]
    what = f"group {g.group} {g.side}"
    return [
        *_num(codes.VOLUME, g.volume_ml, codes.UNIT_CM3, what=what, finding_sites=site),
        *_num(codes.MASS, g.mass_g, codes.UNIT_G, what=what, finding_sites=site),
        *(
            _num(codes.VOLUME_PER_HEIGHT2, g.volume_per_height2_cm3_m2, codes.UNIT_CM3_PER_M2, what=what, finding_sites=site)
            if g.volume_per_height2_cm3_m2 is not None
            else []
        ),
        *(
            _num(codes.SKELETAL_MUSCLE_INDEX, g.smi_kg_m2, codes.UNIT_KG_PER_M2, what=what, finding_sites=site)
            if g.smi_kg_m2 is not None
            else []
        ),
    ]


def _check_groups(measurements: Measurements) -> None:
    for g in measurements.groups:
        if g.group not in codes.GROUP_CODES:
            raise BuildError(
                f"GroupMeasurement.group {g.group!r} is not allowed; allowed: {tuple(codes.GROUP_CODES)}"
            )
        if g.side not in _GROUP_SIDES:
            raise BuildError(f"GroupMeasurement.side {g.side!r} of group {g.group} is not allowed; allowed: {_GROUP_SIDES}")
    if measurements.sarcopenia is not None and measurements.sarcopenia.group not in codes.GROUP_CODES:
        raise BuildError(
            f"SarcopeniaAssessment.group {measurements.sarcopenia.group!r} is not allowed; "
            f"allowed: {tuple(codes.GROUP_CODES)}"
        )


def _patient_group(
    measurements: Measurements, sr_instance_uid: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with the muscle totals, height, sarcopenia assessment and study flags."""
    items: list[hd.sr.Measurement] = []
    for g in measurements.groups:
        items.extend(_group_measurements(g))
    if measurements.height_m is not None:
        items.extend(_num(codes.BODY_HEIGHT, measurements.height_m, codes.UNIT_M, what="patient"))
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    texts: list[tuple[Code, str]] = [
        (codes.HEIGHT_SOURCE, measurements.height_source),
        (codes.MASS_DERIVATION, measurements.density_formula),
    ]
    for g in measurements.groups:
        if g.includes_partial:
            texts.append(
                (
                    codes.COMMENT,
                    f"{codes.GROUP_CODES[g.group].meaning} ({g.side}): the totals include a structure "
                    "cut by the field of view; they are lower bounds",
                )
            )
    sarc = measurements.sarcopenia
    if sarc is not None:
        site = [hd.sr.FindingSite(anatomic_location=codes.GROUP_CODES[sarc.group], laterality=codes.RIGHT_AND_LEFT)]
        items.extend(
            _num(codes.SMI_THRESHOLD, sarc.threshold_kg_m2, codes.UNIT_KG_PER_M2, what="sarcopenia", finding_sites=site)
        )
        evaluations.append(
            hd.sr.QualitativeEvaluation(codes.SMI_BELOW_THRESHOLD, codes.YES if sarc.below_threshold else codes.NO)
        )
        calibration = (
            f"Threshold calibrated for CT ({sarc.source})"
            if sarc.calibrated_for_ct
            else f"Threshold NOT calibrated for CT: {sarc.source}; interpret the comparison with caution"
        )
        texts.append((codes.THRESHOLD_CALIBRATION, calibration))
    for flag in measurements.flags:
        if flag.structure:
            continue
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QUALITY_CONTROL, codes.flag_code(flag.code)))
        texts.append((codes.COMMENT, flag.message))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sr_instance_uid, "patient_totals", SIDE_BOTH), identifier=PATIENT_TOTALS_ID
        ),
        finding_type=codes.SKELETAL_MUSCLE,
        algorithm_id=algorithm,
        measurements=items or None,
        qualitative_evaluations=evaluations or None,
    )
    _add_texts(group, texts)
    return group


def _model_of(seg_dataset: Dataset) -> tuple[str, str]:
    """(AlgorithmName, AlgorithmVersion) of the SEG's segments (the segmentation model)."""
    for item in seg_dataset.SegmentSequence:
        if "SegmentationAlgorithmIdentificationSequence" in item:
            algo = item.SegmentationAlgorithmIdentificationSequence[0]
            return str(algo.AlgorithmName), str(algo.AlgorithmVersion)
    raise BuildError(
        f"SEG {seg_dataset.SOPInstanceUID} has no SegmentationAlgorithmIdentificationSequence in any segment; "
        "the SR needs the model name and version"
    )


def build_sr(
    measurements: Measurements,
    seg_dataset: Dataset,
    source_datasets: Sequence[SourceInput],
    *,
    volume: Volume,
    labels: LabelTable,
    prior: object | None = None,
    manufacturer: str,
    software_version: str,
    device_serial: str,
    institution_name: str | None = None,
    series_number: int = SR_SERIES.number,
    instance_number: int = 1,
    is_final: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report (Comprehensive 3D SR) of one segmented study.

    Args:
        measurements: what the measure stage computed (structures, groups, flags, height,
            sarcopenia).
        seg_dataset: the SEG built by :func:`dicomout.seg.build_seg` for the same study;
            its segments are referenced by TrackingID / TrackingUID / segment number, and
            its algorithm identification names the model.
        source_datasets: the source CT instances (paths or datasets), any order; they and
            the SEG are the SR's evidence (CurrentRequestedProcedureEvidenceSequence).
        volume: the CT volume (series, study, source SOP Instance UIDs).
        labels: the label table (SNOMED CT code of each structure, also for structures
            measured but not found, which have no segment).
        prior: reserved for the longitudinal comparison (see the module docstring); must
            be ``None`` for now.
        manufacturer, software_version, device_serial: the node's General Equipment and
            device observer identity.
        institution_name: InstitutionName, when configured.
        series_number, instance_number: SeriesNumber / InstanceNumber.
        is_final: PreliminaryFlag FINAL instead of PRELIMINARY (the report is never
            VERIFIED: no person has signed it).

    Raises:
        BuildError: a prior was given, the SEG does not belong to the volume's study or
            frame of reference, a structure has an empty SNOMED code, or a group/side value
            is outside what the report can code.
    """
    started = time.monotonic()
    if prior is not None:
        raise BuildError(
            f"a prior comparison ({type(prior).__name__}) was given; the longitudinal comparison is not "
            "implemented in the SR yet (allowed: prior=None)"
        )
    if str(seg_dataset.StudyInstanceUID) != volume.study_instance_uid:
        raise BuildError(
            f"SEG StudyInstanceUID {seg_dataset.StudyInstanceUID} differs from the volume's "
            f"{volume.study_instance_uid}; the SR reports one study"
        )
    if str(seg_dataset.get("FrameOfReferenceUID", "")) != volume.frame_of_reference_uid:
        raise BuildError(
            f"SEG FrameOfReferenceUID {seg_dataset.get('FrameOfReferenceUID')} differs from the volume's "
            f"{volume.frame_of_reference_uid}"
        )
    _check_groups(measurements)
    sources = order_sources(volume, source_datasets)
    model_name, model_version = _model_of(seg_dataset)
    series_uid = output_uid(volume.series_instance_uid, model_version, "sr.series")
    instance_uid = output_uid(volume.series_instance_uid, model_version, "sr.instance")
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    smap = segment_map(seg_dataset)
    seg_items = {int(item.SegmentNumber): item for item in seg_dataset.SegmentSequence}
    source_series = hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid)

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for s in measurements.structures:
        if s.side not in ("right", "left"):
            logger.debug("SR: %s %s has no segment of its own; left to the group totals", s.key, s.side)
            continue
        try:
            finding = structure_code(labels.by_key(s.key))
        except LabelTableError as exc:
            raise BuildError(f"measured structure {s.key!r} ({s.side}) is not in the label table: {exc}") from exc
        site = [hd.sr.FindingSite(anatomic_location=finding, laterality=codes.laterality(s.side))]
        evaluations, texts = _structure_evaluations(s, measurements.flags)
        number = smap.get((s.key, s.side))
        if number is None:
            group: (
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
            ) = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(instance_uid, s.key, s.side), identifier=f"{s.key} {s.side}"
                ),
                finding_type=finding,
                finding_sites=site,
                algorithm_id=algorithm,
                qualitative_evaluations=evaluations or None,
            )
        else:
            item = seg_items[number]
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID)),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg_dataset.SOPClassUID),
                    sop_instance_uid=str(seg_dataset.SOPInstanceUID),
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=finding,
                finding_sites=site,
                algorithm_id=algorithm,
                measurements=_structure_measurements(s) or None,
                qualitative_evaluations=evaluations or None,
            )
        _add_texts(group, texts)
        groups.append(group)
    groups.append(_patient_group(measurements, instance_uid, algorithm))

    observer = hd.sr.ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(DEVICE_OBSERVER_NAME, manufacturer, device_serial),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=manufacturer,
            model_name=model_name[:64],
            serial_number=device_serial or None,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CT_OF_THIGH,
        imaging_measurements=groups,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*sources, seg_dataset],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_complete=True,
            is_final=is_final,
            is_verified=False,
            institution_name=institution_name,
            manufacturer_model_name=DEVICE_OBSERVER_NAME,
            software_versions=software_version,
            device_serial_number=device_serial,
            series_description=SR_SERIES.description(model_name, model_version),
            coding_schemes=[codes.private_scheme_identification()],
        )
    except (ValueError, TypeError) as exc:
        raise BuildError(f"highdicom refused the Comprehensive 3D SR: {exc}") from exc
    logger.info(
        "build_sr end: series %s, %d measurement groups in %.2f s",
        volume.series_instance_uid,
        len(groups),
        time.monotonic() - started,
    )
    return sr
