"""The patient-level group of the TID 1500 SR (PS3.16 TID 1501, tracking identifier
:data:`PATIENT_TOTALS_ID`): muscle-group totals, body height, the sarcopenia screen, the
study-level quality flags and whether a prior study was compared.

Per muscle group (gluteal, above knee, all) and side: volume, mass, volume / height² and SMI
(TID 300), each with the group and side as finding site. A group withheld because the field of
view does not cover its muscles (GroupMeasurement.withheld_reason) has no numeric value: the
group gets a qualitative evaluation "Muscle group total not reported" (private TN0008) whose
value is the group's code, and each withheld side a TEXT "Comment" "<group> (<side>): not
reported: <muscles> <why>". When the sarcopenia group is withheld, a TEXT "Sarcopenia screen"
(TN0009) says "not assessed" and which group's SMI was measured, with or without a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.sr.coding import Code

from dicomout import codes
from dicomout.seg import BuildError
from dicomout.sr_items import add_texts, numeric
from dicomout.uids import tracking_uid
from pipeline.types import SIDE_BOTH, Comparison, GroupMeasurement, Measurements, PriorSearch

PATIENT_TOTALS_ID = "patient totals"
"""Tracking Identifier of the patient-level measurement group."""

_GROUP_SIDES = ("right", "left", SIDE_BOTH)


def _group_measurements(g: GroupMeasurement) -> list[hd.sr.Measurement]:
    if not g.reported:
        return []  # withheld: no value at all, the reason is a TEXT (_withheld_group_items)
    site = [hd.sr.FindingSite(anatomic_location=codes.GROUP_CODES[g.group], laterality=codes.laterality(g.side))]
    what = f"group {g.group} {g.side}"
    return [
        *numeric(codes.VOLUME, g.volume_ml, codes.UNIT_CM3, what=what, finding_sites=site),
        *numeric(codes.MASS, g.mass_g, codes.UNIT_G, what=what, finding_sites=site),
        *(
            numeric(codes.VOLUME_PER_HEIGHT2, g.volume_per_height2_cm3_m2, codes.UNIT_CM3_PER_M2, what=what, finding_sites=site)
            if g.volume_per_height2_cm3_m2 is not None
            else []
        ),
        *(
            numeric(codes.SKELETAL_MUSCLE_INDEX, g.smi_kg_m2, codes.UNIT_KG_PER_M2, what=what, finding_sites=site)
            if g.smi_kg_m2 is not None
            else []
        ),
    ]


def check_groups(measurements: Measurements) -> None:
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


def _withheld_group_items(
    groups: Sequence[GroupMeasurement],
) -> tuple[list[hd.sr.QualitativeEvaluation], list[tuple[Code, str]]]:
    """Per group withheld on any side: "Muscle group total not reported" = the group (CODE), and
    per withheld side its reason as TEXT "Comment" (no numeric value is written for it)."""
    names = [name for name in dict.fromkeys(g.group for g in groups) if any(
        not g.reported for g in groups if g.group == name)]
    evaluations = [hd.sr.QualitativeEvaluation(codes.GROUP_NOT_REPORTED, codes.GROUP_CODES[name]) for name in names]
    texts = [
        (codes.COMMENT, f"{codes.GROUP_CODES[g.group].meaning} ({g.side}): {g.withheld_reason}")
        for g in groups
        if not g.reported
    ]
    return evaluations, texts


def _sarcopenia_items(
    measurements: Measurements,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation], list[tuple[Code, str]]]:
    """The SMI threshold, below-threshold yes/no and calibration text of the screen, and the
    "Sarcopenia screen" TEXT when the configured group was withheld."""
    items: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    texts: list[tuple[Code, str]] = []
    note = measurements.sarcopenia_not_assessed
    if note is not None:
        texts.append((codes.SARCOPENIA_SCREEN, _not_assessed_text(measurements)))
    sarc = measurements.sarcopenia
    if sarc is not None:
        site = [hd.sr.FindingSite(anatomic_location=codes.GROUP_CODES[sarc.group], laterality=codes.RIGHT_AND_LEFT)]
        items.extend(
            numeric(codes.SMI_THRESHOLD, sarc.threshold_kg_m2, codes.UNIT_KG_PER_M2, what="sarcopenia", finding_sites=site)
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
    return items, evaluations, texts


def _not_assessed_text(measurements: Measurements) -> str:
    """'not assessed: all muscles not fully in the field of view; measured: Gluteal muscles SMI
    0.61 kg/m² (both sides), no threshold applied (none configured for that group)'."""
    note = measurements.sarcopenia_not_assessed
    assert note is not None
    if not note.measured_group:
        return note.reason + "; no muscle group is fully in the field of view"
    smi = "SMI not given (no height)" if note.measured_smi_kg_m2 is None else f"SMI {note.measured_smi_kg_m2:.2f} kg/m²"
    how = (
        "screened with the site's threshold for that group"
        if note.measured_threshold_applied
        else "no threshold applied (none configured for that group)"
    )
    return f"{note.reason}; measured: {codes.GROUP_CODES[note.measured_group].meaning} {smi} (both sides), {how}"


def patient_group(
    measurements: Measurements,
    sr_instance_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    *,
    prior: Comparison | None = None,
    prior_search: PriorSearch | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with the muscle totals (or why a group is not reported), height, sarcopenia
    assessment and study flags, and whether a prior study was compared (DCM 122140; when not, the
    search as TEXT)."""
    items: list[hd.sr.Measurement] = []
    for g in measurements.groups:
        items.extend(_group_measurements(g))
    if measurements.height_m is not None:
        items.extend(numeric(codes.BODY_HEIGHT, measurements.height_m, codes.UNIT_M, what="patient"))
    texts: list[tuple[Code, str]] = [
        (codes.HEIGHT_SOURCE, measurements.height_source),
        (codes.MASS_DERIVATION, measurements.density_formula),
    ]
    for g in measurements.groups:
        if g.includes_partial and g.reported:
            texts.append(
                (
                    codes.COMMENT,
                    f"{codes.GROUP_CODES[g.group].meaning} ({g.side}): the totals include a structure "
                    "cut by the field of view; they are lower bounds",
                )
            )
    evaluations, withheld_texts = _withheld_group_items(measurements.groups)
    texts.extend(withheld_texts)
    sarc_items, sarc_evaluations, sarc_texts = _sarcopenia_items(measurements)
    items.extend(sarc_items)
    evaluations.extend(sarc_evaluations)
    texts.extend(sarc_texts)
    for flag in measurements.flags:
        if flag.structure:
            continue
        evaluations.append(hd.sr.QualitativeEvaluation(codes.QUALITY_CONTROL, codes.flag_code(flag.code)))
        texts.append((codes.COMMENT, flag.message))
    if prior is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.COMPARISON_WITH_PRIOR_DONE, codes.YES))
    elif prior_search is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.COMPARISON_WITH_PRIOR_DONE, codes.NO))
        texts.append((codes.PRIOR_STUDY_SEARCH, search_text(prior_search)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sr_instance_uid, "patient_totals", SIDE_BOTH), identifier=PATIENT_TOTALS_ID
        ),
        finding_type=codes.SKELETAL_MUSCLE,
        algorithm_id=algorithm,
        measurements=items or None,
        qualitative_evaluations=evaluations or None,
    )
    add_texts(group, texts)
    return group


def search_text(search: PriorSearch) -> str:
    """The patient-level TEXT on the prior study search (no comparison given)."""
    where = "; ".join(search.looked_in) or "nowhere (no source configured)"
    if search.found:
        head = f"Prior study {search.prior_study_uid or '(UID unknown)'} found but not compared"
    else:
        head = "No prior study found"
    text = f"{head}. Looked in: {where}."
    return f"{text} {search.message}" if search.message else text

