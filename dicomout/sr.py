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
  algorithm identification (TID 4019: name, version and, when the SEG names them, the weights'
  sha256 as the TEXT "Algorithm Parameters" ``weights_sha256=<64 hex>``); measurements (TID 300): volume (cm3, method "sum of
  segmented voxels"), mean and standard deviation of attenuation (HU), mass (g), fat
  fraction (%); quality flags as qualitative evaluations "Quality Control" = flag code, each
  followed by its message as a TEXT "Comment"; with ``[model] uncertainty = "tta"`` the
  segmentation's uncertainty (pipeline.uncertainty): "Mean normalized voxel entropy of the
  segmentation" (TN0301, UCUM "1") and "Volume coefficient of variation across augmentation
  samples" (TN0302, %), both with method "Test-time augmentation" (TN0304), and
  the qualitative evaluation "Low segmentation confidence" (TN0303) = Yes / No;
* a TID 1501 "Measurements and Qualitative Evaluations" group per structure and side that
  was measured but has no segment (not found), with its flags;
* a TID 1501 patient-level group, tracking identifier "patient totals": per muscle group
  (gluteal, above knee, all) and side, volume, mass, volume / height² and skeletal muscle
  index (mass / height²), each with the group and side as finding site; the body height
  used; the sarcopenia assessment (SMI threshold, below-threshold yes/no, and whether the
  threshold is calibrated for CT as text); the study-level quality flags. A group withheld
  because the field of view does not cover its muscles (GroupMeasurement.withheld_reason) has
  no numeric value: the group gets a qualitative evaluation "Muscle group total not reported"
  (private TN0008) whose value is the group's code, and each withheld side a TEXT "Comment"
  "<group> (<side>): not reported: <muscles> <why>"; when the sarcopenia group is withheld, a
  TEXT "Sarcopenia screen" (TN0009) says "not assessed" and which group's SMI was measured.

Coded concepts are in :mod:`dicomout.codes`; private ones use the coding scheme
"99THIGHNODE", declared in CodingSchemeIdentificationSequence.

Longitudinal comparison (``prior``, a :class:`pipeline.types.Comparison`):

* in each structure/side group with a :class:`pipeline.types.StructureChange`, the values
  over the common range of the leg both scans cover, as further TID 300 measurements:
  prior and current volume (cm3), volume change (cm3), volume change relative to the prior
  volume (%), volume change per height² (cm3/m2), mass change (g), mean attenuation change
  (HU), fat fraction change (percentage points, unit %), and the common range's inferior and
  superior limits relative to the landmark (mm); a value that is None (not compared, or
  HU-based values withheld because of metal) is left out. DCM 122140 "Comparison with Prior
  Study Done" = Yes / No says whether the structure was compared; each StructureChange flag
  is a qualitative evaluation "Comparison quality flag"; the reason (why not compared, over
  which range, which caveat) is a TEXT "Comparison note". A change for a structure with no
  group of its own (e.g. found only in the prior study) gets a TID 1501 group;
* a TID 1501 group, tracking identifier :data:`PRIOR_COMPARISON_ID`, that identifies the
  prior study: UIDREF DCM 110180 "Study Instance UID", DATE DCM 111060 "Study Date", the
  interval in days (UCUM "d"), the alignment landmark and the method sentence as TEXT, the
  operated side (laterality, CID 244) when there is one;
* in the patient-level group, DCM 122140 "Comparison with Prior Study Done" = Yes.

No prior (``prior_search`` with ``found`` False): the patient-level group gets DCM 122140 =
No and a TEXT "Prior study search" that begins "No prior study found" and names where the
node looked and the search's message.

The prior study's instances are not in the evidence (PertinentOtherEvidenceSequence needs
series and SOP Instance UIDs, which a Comparison does not carry); the prior study is
referenced by its StudyInstanceUID only.
"""

from __future__ import annotations

import logging
import datetime
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code
from pydicom.uid import RE_VALID_UID

from dicomout import codes
from dicomout.context import Equipment, Verification
from dicomout.seg import (
    WEIGHTS_SHA256_PARAMETER, BuildError, SourceInput, order_sources, segment_map, structure_code,
)
from dicomout.sr_items import add_texts, numeric
from dicomout.sr_totals import PATIENT_TOTALS_ID, check_groups, patient_group  # noqa: F401 (PATIENT_TOTALS_ID: public here)
from dicomout.uids import SR_SERIES, SR_VERIFIED_SERIES, device_observer_uid, output_uid, tracking_uid
from pipeline.errors import LabelTableError
from pipeline.labels import LabelTable
from pipeline.types import (
    SIDE_BOTH,
    Comparison,
    Measurements,
    PriorSearch,
    QualityFlag,
    StructureChange,
    StructureMeasurement,
    Volume,
)

logger = logging.getLogger(__name__)

DEVICE_OBSERVER_NAME = "thighnode"
PRIOR_COMPARISON_ID = "prior study comparison"
"""Tracking Identifier of the group that identifies the prior study of the comparison."""


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
    if s.uncertainty is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            codes.LOW_CONFIDENCE, codes.YES if s.uncertainty.low_confidence else codes.NO))
    return evaluations, texts


def _uncertainty_measurements(s: StructureMeasurement) -> list[hd.sr.Measurement]:
    """Mean normalised entropy and volume CV (private TN0301 / TN0302, method TN0304), if measured."""
    u = s.uncertainty
    if u is None:
        return []
    what = f"{s.key} {s.side} uncertainty"
    return [
        *numeric(codes.SEGMENTATION_ENTROPY, u.mean_entropy, codes.UNIT_ONE, what=what,
                 method=codes.TEST_TIME_AUGMENTATION),
        *numeric(codes.VOLUME_SPREAD, u.volume_cv_pct, codes.UNIT_PERCENT, what=what,
                 method=codes.TEST_TIME_AUGMENTATION),
    ]


def _structure_measurements(s: StructureMeasurement) -> list[hd.sr.Measurement]:
    what = f"{s.key} {s.side}"
    return [
        *numeric(codes.VOLUME, s.volume_ml, codes.UNIT_CM3, what=what, method=codes.SUM_OF_SEGMENTED_VOXELS),
        *numeric(codes.ATTENUATION_COEFFICIENT, s.mean_hu, codes.UNIT_HU, what=what, derivation=codes.MEAN),
        *numeric(
            codes.ATTENUATION_COEFFICIENT, s.std_hu, codes.UNIT_HU, what=what, derivation=codes.STANDARD_DEVIATION
        ),
        *numeric(codes.MASS, s.mass_g, codes.UNIT_G, what=what),
        *numeric(codes.FAT_FRACTION, 100.0 * s.fat_fraction, codes.UNIT_PERCENT, what=what),
    ]


def _change_num(name: Code, value: float | None, unit: Code) -> list[hd.sr.Measurement]:
    """A TID 300 measurement of a comparison value; nothing when it is None or not finite
    (a value withheld by the comparison: its reason is in the group's comparison note)."""
    if value is None or not math.isfinite(float(value)):
        return []
    return [hd.sr.Measurement(name=name, value=float(value), unit=unit)]


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _change_items(
    c: StructureChange,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation], list[tuple[Code, str]]]:
    """The comparison content of one structure/side group: change measurements (TID 300),
    "Comparison with Prior Study Done" and the comparison flags (qualitative evaluations),
    and the comparison note (TEXT)."""
    lo, hi = c.common_range_mm if c.common_range_mm is not None else (None, None)
    measurements = [
        *_change_num(codes.PRIOR_VOLUME_COMMON_RANGE, c.prior_volume_ml, codes.UNIT_CM3),
        *_change_num(codes.CURRENT_VOLUME_COMMON_RANGE, c.current_volume_ml, codes.UNIT_CM3),
        *_change_num(codes.VOLUME_CHANGE, c.change_ml, codes.UNIT_CM3),
        *_change_num(codes.VOLUME_CHANGE_RATIO, _percent(c.change_ratio), codes.UNIT_PERCENT),
        *_change_num(codes.VOLUME_CHANGE_PER_HEIGHT2, c.change_per_height2_cm3_m2, codes.UNIT_CM3_PER_M2),
        *_change_num(codes.MASS_CHANGE, c.change_mass_g, codes.UNIT_G),
        *_change_num(codes.MEAN_ATTENUATION_CHANGE, c.change_mean_hu, codes.UNIT_HU),
        *_change_num(codes.FAT_FRACTION_CHANGE, _percent(c.change_fat_fraction), codes.UNIT_PERCENT),
        *_change_num(codes.COMMON_RANGE_INFERIOR, lo, codes.UNIT_MM),
        *_change_num(codes.COMMON_RANGE_SUPERIOR, hi, codes.UNIT_MM),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.COMPARISON_WITH_PRIOR_DONE, codes.YES if c.compared else codes.NO),
        *(hd.sr.QualitativeEvaluation(codes.COMPARISON_FLAG, codes.comparison_flag_code(f)) for f in c.flags),
    ]
    note = c.reason or ("compared" if c.compared else "not compared (no reason given)")
    return measurements, evaluations, [(codes.COMPARISON_NOTE, note)]


def _change_only_group(
    c: StructureChange, labels: LabelTable, sr_instance_uid: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for a compared structure/side that has no measurement in this study
    (e.g. found only in the prior study): its comparison content only."""
    try:
        finding = structure_code(labels.by_key(c.key))
    except LabelTableError as exc:
        raise BuildError(f"compared structure {c.key!r} ({c.side}) is not in the label table: {exc}") from exc
    measurements, evaluations, texts = _change_items(c)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sr_instance_uid, c.key, c.side), identifier=f"{c.key} {c.side}"
        ),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(anatomic_location=finding, laterality=codes.laterality(c.side))],
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    add_texts(group, texts)
    return group


def _check_prior(prior: object | None, prior_search: object | None, volume: Volume) -> None:
    """Validate the comparison inputs once, at the builder's edge."""
    if prior is not None and not isinstance(prior, Comparison):
        raise BuildError(
            f"the prior comparison is a {type(prior).__name__}; allowed: pipeline.types.Comparison or None"
        )
    if prior_search is not None and not isinstance(prior_search, PriorSearch):
        raise BuildError(
            f"prior_search is a {type(prior_search).__name__}; allowed: pipeline.types.PriorSearch or None"
        )
    if prior is None:
        return
    uid = prior.prior_study_uid
    if len(uid) > 64 or not RE_VALID_UID.match(uid):
        raise BuildError(
            f"Comparison.prior_study_uid {uid!r} is not a valid UID; allowed: dot-separated numbers without "
            "leading zeros, at most 64 characters (PS3.5 9.1)"
        )
    if uid == volume.study_instance_uid:
        raise BuildError(f"Comparison.prior_study_uid {uid} is the current study's StudyInstanceUID; allowed: another study")
    if prior_search is not None and not prior_search.found:
        raise BuildError(
            f"a comparison with prior study {uid} was given, but prior_search says no prior was found "
            f"({prior_search.message!r}); allowed: prior_search.found True, or no comparison"
        )
    seen: set[tuple[str, str]] = set()
    for c in prior.changes:
        if c.side not in ("right", "left"):
            raise BuildError(f"StructureChange {c.key} side {c.side!r} is not allowed; allowed: ('right', 'left')")
        if (c.key, c.side) in seen:
            raise BuildError(f"StructureChange {c.key} {c.side} appears twice in the comparison; allowed: once")
        seen.add((c.key, c.side))


def _prior_group(
    prior: Comparison, sr_instance_uid: str, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group identifying the prior study: UIDREF Study Instance UID, DATE Study Date,
    the interval in days, the operated side, the landmark and the method (TEXT)."""
    items = _change_num(codes.COMPARISON_INTERVAL, prior.interval_days, codes.UNIT_DAY)
    side = codes.laterality(prior.operated_side)
    evaluations = [hd.sr.QualitativeEvaluation(codes.OPERATED_SIDE, side)] if side is not None else []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sr_instance_uid, "prior_comparison", SIDE_BOTH), identifier=PRIOR_COMPARISON_ID
        ),
        finding_type=codes.SKELETAL_MUSCLE,
        algorithm_id=algorithm,
        measurements=items or None,
        qualitative_evaluations=evaluations or None,
    )
    container = group[0]
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container.ContentSequence.append(
        hd.sr.UIDRefContentItem(name=codes.STUDY_INSTANCE_UID, value=prior.prior_study_uid, relationship_type=contains)
    )
    date = _study_date(prior.prior_study_date)
    if date is not None:
        container.ContentSequence.append(
            hd.sr.DateContentItem(name=codes.STUDY_DATE, value=date, relationship_type=contains)
        )
    add_texts(group, [(codes.COMPARISON_LANDMARK, prior.landmark), (codes.COMPARISON_METHOD, prior.method)])
    return group


def _study_date(da: str) -> datetime.date | None:
    """A DICOM DA (YYYYMMDD) as a date; None (logged) when empty or invalid."""
    try:
        return datetime.datetime.strptime(da.strip(), "%Y%m%d").date()
    except (ValueError, AttributeError):
        logger.warning("SR: prior StudyDate %r is not a DICOM DA (YYYYMMDD); Study Date left out", da)
        return None


@dataclass(frozen=True)
class _Model:
    """The segmentation model as the SEG identifies it; ``weights_sha256`` is "" when the SEG does not say."""

    name: str
    version: str
    weights_sha256: str = ""


def _parameter(parameters: str, key: str) -> str:
    """The value of ``key`` in an AlgorithmParameters string ``k1=v1,k2=v2`` ("" when absent)."""
    for part in parameters.split(","):
        name, _, value = part.partition("=")
        if name.strip() == key:
            return value.strip()
    return ""


def _model_of(seg_dataset: Dataset) -> _Model:
    """The model of the SEG's segments: AlgorithmName, AlgorithmVersion and the weights' sha256 from
    AlgorithmParameters (:data:`dicomout.seg.WEIGHTS_SHA256_PARAMETER`)."""
    for item in seg_dataset.SegmentSequence:
        if "SegmentationAlgorithmIdentificationSequence" in item:
            algo = item.SegmentationAlgorithmIdentificationSequence[0]
            sha256 = _parameter(str(algo.get("AlgorithmParameters", "") or ""), WEIGHTS_SHA256_PARAMETER)
            return _Model(str(algo.AlgorithmName), str(algo.AlgorithmVersion), sha256)
    raise BuildError(
        f"SEG {seg_dataset.SOPInstanceUID} has no SegmentationAlgorithmIdentificationSequence in any segment; "
        "the SR needs the model name and version"
    )


def _check_inputs(
    measurements: Measurements,
    seg_dataset: Dataset,
    volume: Volume,
    prior: Comparison | None,
    prior_search: PriorSearch | None,
) -> None:
    """The comparison, the SEG and the group values must fit the volume and each other."""
    _check_prior(prior, prior_search, volume)
    _check_seg(seg_dataset, volume)
    check_groups(measurements)


def _check_seg(seg_dataset: Dataset, volume: Volume) -> None:
    """The SEG must describe the volume's study and frame of reference."""
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


_Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


@dataclass(frozen=True)
class _ReportParts:
    """What every structure group of one report refers to: the SEG, the SR's UID, the model."""

    seg_dataset: Dataset
    segment_numbers: dict[tuple[str, str], int]
    segment_items: dict[int, Dataset]  # SegmentSequence items by SegmentNumber
    instance_uid: str
    algorithm: hd.sr.AlgorithmIdentification
    labels: LabelTable
    source_series: hd.sr.SourceSeriesForSegmentation
    verification: Verification | None = None


def _report_parts(
    seg_dataset: Dataset, volume: Volume, labels: LabelTable, model: _Model,
    instance_uid: str | None = None, verification: Verification | None = None,
) -> _ReportParts:
    parameters = [f"{WEIGHTS_SHA256_PARAMETER}={model.weights_sha256}"] if model.weights_sha256 else None
    return _ReportParts(
        seg_dataset=seg_dataset,
        segment_numbers=segment_map(seg_dataset),
        segment_items={int(item.SegmentNumber): item for item in seg_dataset.SegmentSequence},
        instance_uid=instance_uid or output_uid(volume.series_instance_uid, model.version, "sr.instance"),
        algorithm=hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64], parameters=parameters),
        labels=labels,
        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        verification=verification,
    )


def _structure_group(
    s: StructureMeasurement, parts: _ReportParts, flags: Sequence[QualityFlag], change: StructureChange | None
) -> _Group:
    """The TID 1411 group of a structure/side with a segment, else a TID 1501 group (PS3.16)."""
    try:
        finding = structure_code(parts.labels.by_key(s.key))
    except LabelTableError as exc:
        raise BuildError(f"measured structure {s.key!r} ({s.side}) is not in the label table: {exc}") from exc
    site = [hd.sr.FindingSite(anatomic_location=finding, laterality=codes.laterality(s.side))]
    evaluations, texts = _structure_evaluations(s, flags)
    change_measurements: list[hd.sr.Measurement] = []
    if change is not None:
        change_measurements, change_evaluations, change_texts = _change_items(change)
        evaluations += change_evaluations
        texts += change_texts
    if parts.verification is not None:
        texts += _model_value_texts(parts.verification, s.key, s.side)
    number = parts.segment_numbers.get((s.key, s.side))
    group: _Group
    if number is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(parts.instance_uid, s.key, s.side), identifier=f"{s.key} {s.side}"
            ),
            finding_type=finding,
            finding_sites=site,
            algorithm_id=parts.algorithm,
            measurements=change_measurements or None,
            qualitative_evaluations=evaluations or None,
        )
    else:
        item = parts.segment_items[number]
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID)),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(parts.seg_dataset.SOPClassUID),
                sop_instance_uid=str(parts.seg_dataset.SOPInstanceUID),
                segment_number=number,
                source_series=parts.source_series,
            ),
            finding_type=finding,
            finding_sites=site,
            algorithm_id=parts.algorithm,
            measurements=[*_structure_measurements(s), *_uncertainty_measurements(s), *change_measurements] or None,
            qualitative_evaluations=evaluations or None,
        )
    add_texts(group, texts)
    return group


def _model_value_texts(verification: Verification, key: str, side: str) -> list[tuple[Code, str]]:
    """The model's volume beside the corrected one (a verified report keeps the model's values)."""
    d = verification.difference(key, side)
    if d is None:
        return []
    return [(
        codes.COMMENT,
        f"Corrected by the reader: model volume {d.model_volume_ml:.1f} cm3, corrected volume "
        f"{d.corrected_volume_ml:.1f} cm3, corrected - model {d.difference_ml:+.1f} cm3",
    )]


def _observation_context(model_name: str, equipment: Equipment, verification: Verification | None) -> hd.sr.ObservationContext:
    """The node as device observer (TID 1004); with a correction, the reader as person observer (TID 1003) too."""
    person = None
    if verification is not None:
        person = hd.sr.ObserverContext(
            observer_type=pydicom_codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=verification.observer_name or "UNKNOWN", organization_name=verification.organization or None,
            ),
        )
    return hd.sr.ObservationContext(observer_person_context=person, observer_device_context=_observer(model_name, equipment))


def _set_verification_time(sr: hd.sr.Comprehensive3DSR, verification: Verification | None) -> None:
    """VerificationDateTime from the correction (deterministic), not highdicom's "now"."""
    if verification is not None:
        sr.VerifyingObserverSequence[0].VerificationDateTime = verification.verified_at.strftime("%Y%m%d%H%M%S")


def _verification_flags(verification: Verification | None, is_final: bool) -> dict[str, object]:
    """SR Document General Module (PS3.3 C.17.2): a reader's correction makes the report VERIFIED and
    FINAL, with VerifyingObserverSequence naming the correction SEG's ContentCreatorName; the reader
    is also the person observer (TID 1003) and each structure group carries the model's volume and
    the difference (:func:`_model_value_texts`)."""
    if verification is None:
        return {"is_final": is_final, "is_verified": False}
    return {
        "is_final": True, "is_verified": True, "verifying_observer_name": verification.observer_name or "UNKNOWN",
        "verifying_organization": verification.organization or "UNKNOWN",
    }


def _measurement_groups(
    measurements: Measurements, parts: _ReportParts, prior: Comparison | None, prior_search: PriorSearch | None
) -> list[_Group]:
    """Structure groups (right/left), change-only groups, the patient group and the prior group, in that order."""
    groups: list[_Group] = []
    compared_keys: set[tuple[str, str]] = set()
    for s in measurements.structures:
        if s.side not in ("right", "left"):
            logger.debug("SR: %s %s has no segment of its own; left to the group totals", s.key, s.side)
            continue
        change = prior.change(s.key, s.side) if prior is not None else None
        if change is not None:
            compared_keys.add((s.key, s.side))
        groups.append(_structure_group(s, parts, measurements.flags, change))
    if prior is not None:
        for change in prior.changes:
            if (change.key, change.side) not in compared_keys:
                groups.append(_change_only_group(change, parts.labels, parts.instance_uid, parts.algorithm))
    groups.append(
        patient_group(measurements, parts.instance_uid, parts.algorithm, prior=prior, prior_search=prior_search)
    )
    if prior is not None:
        groups.append(_prior_group(prior, parts.instance_uid, parts.algorithm))
    return groups


def _observer(model_name: str, equipment: Equipment) -> hd.sr.ObserverContext:
    """The node as device observer (TID 1004)."""
    return hd.sr.ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(DEVICE_OBSERVER_NAME, equipment.manufacturer, equipment.device_serial),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=equipment.manufacturer,
            model_name=model_name[:64],
            serial_number=equipment.device_serial or None,
        ),
    )


def build_sr(
    measurements: Measurements,
    seg_dataset: Dataset,
    source_datasets: Sequence[SourceInput],
    *,
    volume: Volume,
    labels: LabelTable,
    equipment: Equipment,
    prior: Comparison | None = None,
    prior_search: PriorSearch | None = None,
    series_number: int = SR_SERIES.number,
    instance_number: int = 1,
    is_final: bool = False,
    series_uid: str | None = None, instance_uid: str | None = None, verification: Verification | None = None,
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
        equipment: the node's General Equipment and device observer identity;
            InstitutionName when its ``institution_name`` is not empty.
        prior: the comparison with the patient's prior study (pipeline.compare), added
            per structure/side group and as the prior-study group (module docstring).
        prior_search: where the node looked for a prior study; with no ``prior`` it is
            reported in the patient-level group ("No prior study found ..."); with a
            ``prior`` it must say found.
        series_number, instance_number: SeriesNumber / InstanceNumber.
        is_final: PreliminaryFlag FINAL instead of PRELIMINARY.
        series_uid, instance_uid, verification: UIDs instead of those derived from the source series and
            model; a reader's correction (:func:`_verification_flags`), else never VERIFIED: no person signed.

    Raises:
        BuildError: the SEG does not belong to the volume's study or frame of reference, a
            structure has an empty SNOMED code, a group/side value is outside what the
            report can code, or the comparison is inconsistent (not a Comparison, the
            current study as its own prior, an invalid prior UID, a side other than right
            or left, a structure/side twice, or a prior_search saying none was found).
    """
    started = time.monotonic()
    _check_inputs(measurements, seg_dataset, volume, prior, prior_search)
    sources = order_sources(volume, source_datasets)
    model = _model_of(seg_dataset)
    parts = _report_parts(seg_dataset, volume, labels, model, instance_uid, verification)
    groups = _measurement_groups(measurements, parts, prior, prior_search)
    context = _observation_context(model.name, equipment, verification)
    report = hd.sr.MeasurementReport(context, codes.CT_OF_THIGH, imaging_measurements=groups)
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*sources, seg_dataset],
            content=report,
            series_instance_uid=series_uid or output_uid(volume.series_instance_uid, model.version, "sr.series"),
            series_number=series_number,
            sop_instance_uid=parts.instance_uid, instance_number=instance_number,
            manufacturer=equipment.manufacturer,
            is_complete=True,
            **_verification_flags(verification, is_final),
            institution_name=equipment.institution_name or None,
            manufacturer_model_name=DEVICE_OBSERVER_NAME, software_versions=equipment.software_version,
            device_serial_number=equipment.device_serial,
            series_description=(SR_VERIFIED_SERIES if verification else SR_SERIES).description(model.name, model.version),
            coding_schemes=[codes.private_scheme_identification()],
        )
    except (ValueError, TypeError) as exc:
        raise BuildError(f"highdicom refused the Comprehensive 3D SR: {exc}") from exc
    _set_verification_time(sr, verification)
    logger.info(
        "build_sr end: series %s, %d measurement groups, prior study %s in %.2f s",
        volume.series_instance_uid, len(groups), prior.prior_study_uid if prior is not None else "none",
        time.monotonic() - started,
    )
    return sr
