"""Muscle-group totals by coverage, and the sarcopenia screen on them (part of pipeline.measure).

A group (gluteal, above knee, all; per side and both sides) is the sum of its member muscles,
and it is only worth reporting when the field of view covers those muscles: a hip CT (pelvis to
proximal femur) cuts the thigh muscles, and an "above knee" total summed over what it holds
would read as a small, sarcopenic patient. So each group is reported only when it is covered.

Coverage of a group on a side (for "both": on either side)
    Every member muscle must be *covered*, i.e. neither

    * **cut** by the field of view: flagged partial_fov_top / partial_fov_bottom, unless the
      muscle runs past the groups' region at that end by anatomy (settings ``crossing_superior``
      / ``crossing_inferior``: the hamstrings, sartorius and gracilis cross the knee, the psoas,
      abdominal wall and multifidus run up into the trunk): a scan from the iliac crest to the
      knee cuts those by design, and the groups count what lies in the region (as the SMI paper,
      004, counts the "muscles above the knee joint" and leaves the psoas out); nor
    * **absent** from the field of view: no voxel on that side while the field of view does not
      cover the groups' region on that side, which shows as a muscle of that side that is cut
      where its anatomy does not run past (e.g. the vasti cut by a hip CT, so the gracilis
      missing there lies below the scan).

    The superior end of the region is the iliac crest: where the ilium (settings
    ``superior_landmark``) is whole in the field of view on a side, the scan reaches above the
    crest and no muscle is cut at the superior edge there, even if its label touches that edge
    (nothing of the region lies above the crest; a touching label is leakage, or the rounded
    end of a phantom's gluteus medius). The knee has no such landmark in the label table (the
    femur is cut at the knee by a thigh CT), so the inferior end relies on ``crossing_inferior``.

    The gluteal group has an inferior landmark of its own: where the femur label reaches at least
    ``gluteal_min_reach_mm`` (default 50 mm) above the inferior edge of the field of view on a
    side, the scan covers the hip down to about the lesser trochanter, where hip and abdominal
    CTs usually end; the SMI paper (004) measures the gluteal group on exactly such scans (AUC
    0.93). There, gluteal muscles cut at the inferior edge (the distal insertion of the gluteus
    maximus, the deep rotators) and gluteal muscles with no voxel do not withhold the gluteal
    group: it is reported over the field of view, marked as including partial muscles, and the
    partial flags stay on the muscles. A scan that ends higher (through the femoral head) still
    withholds it.

    A muscle with no voxel on a side whose region is fully covered is a segmentation failure,
    not a coverage gap: it keeps its FLAG_EMPTY ("not found") flag and the group is reported as
    before, the flag beside it.

    A withheld group keeps its member keys; its volume, mass, volume/height² and SMI are None
    and ``withheld_reason`` names the muscles and why, e.g. "not reported: vastus lateralis
    right, rectus femoris right cut at the inferior edge of the field of view".

Sarcopenia screen (:func:`assess_sarcopenia`)
    On the configured group (``sarcopenia_group``, both sides) when it is reported, as before.
    When it is withheld the screen is not assessed (:class:`SarcopeniaNotAssessed`, "not
    assessed: all muscles not fully in the field of view") and names the SMI of the
    largest reported group instead (for a hip CT the gluteal group, whose SMI the SMI paper
    (004) found as good a screen, AUC 0.93). No threshold is applied to that SMI unless the site
    configured one for that group (``group_thresholds``, config/measurement.toml
    [sarcopenia.group_thresholds.<group>]); then the assessment is made on that group with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.labels import FEMUR_KEY, LabelTable
from pipeline.types import (
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    SIDE_BOTH,
    SIDE_LEFT,
    SIDE_RIGHT,
    GroupMeasurement,
    SarcopeniaAssessment,
    SarcopeniaNotAssessed,
    Segmentation,
    StructureMeasurement,
)

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.measure import MeasurementSettings

CROSSING_INFERIOR = ("sartorius", "gracilis", "semitendinosus", "semimembranosus", "biceps_femoris")
"""Muscles that cross the knee: a scan that ends at the knee cuts them by anatomy."""
CROSSING_SUPERIOR = ("psoas", "abdominal_oblique", "rectus_abdominis", "multifidus")
"""Muscles that run up into the trunk: a scan that starts at the iliac crest cuts them by anatomy."""
SUPERIOR_LANDMARK = "ilium"
"""Its top is the iliac crest, the groups' superior end: whole in the field of view on a side,
no muscle of the region is cut at the superior edge there (a label touching it lies above the
crest: leakage, or a phantom's rounded muscle end)."""

GLUTEAL_MIN_REACH_MM = 50.0
"""How far the femur must reach above the inferior edge of the field of view (about the lesser
trochanter) for the gluteal group to count as covered at its inferior end."""

CUT_SUPERIOR = "cut at the superior edge of the field of view"
CUT_INFERIOR = "cut at the inferior edge of the field of view"
ABSENT = "not in the field of view"
_WHY_ORDER = (CUT_INFERIOR, CUT_SUPERIOR, ABSENT)
_SIDES = ("right", "left")
_GROUP_WORDS = {GROUP_GLUTEAL: "the gluteal group", GROUP_ABOVE_KNEE: "the above-knee group", GROUP_ALL: "all muscles"}


@dataclass(frozen=True)
class GroupThreshold:
    """A site's SMI threshold for a group other than the configured sarcopenia group, applied
    only when that group is reported and the configured one is withheld."""

    group: str
    threshold_female_kg_m2: float
    threshold_male_kg_m2: float
    calibrated_for_ct: bool
    source: str

    def for_sex(self, sex: str) -> float | None:
        return {"F": self.threshold_female_kg_m2, "M": self.threshold_male_kg_m2}.get(sex)


@dataclass(frozen=True)
class _Gap:
    """A member muscle that keeps a group from being covered."""

    key: str
    name: str
    side: str
    why: str  # CUT_SUPERIOR, CUT_INFERIOR or ABSENT


@dataclass(frozen=True)
class _Coverage:
    """What decides, per side, whether a member muscle is cut by or absent from the field of view."""

    by_key_side: Mapping[tuple[str, str], StructureMeasurement]
    crest_in_view: Mapping[str, bool]  # the superior landmark is whole on that side
    region_cut: Mapping[str, bool]  # a muscle is cut where its anatomy does not run past the region
    settings: MeasurementSettings


def _cuts(s: StructureMeasurement, settings: MeasurementSettings, crest_in_view: bool) -> list[str]:
    """The ends at which the field of view cuts ``s`` where its anatomy does not run past."""
    out = []
    if FLAG_PARTIAL_BOTTOM in s.flags and s.key not in settings.crossing_inferior:
        out.append(CUT_INFERIOR)
    if FLAG_PARTIAL_TOP in s.flags and s.key not in settings.crossing_superior and not crest_in_view:
        out.append(CUT_SUPERIOR)
    return out


def _coverage(
    structures: Sequence[StructureMeasurement], table: LabelTable, settings: MeasurementSettings
) -> _Coverage:
    by_key_side = {(s.key, s.side): s for s in structures}
    crest = {
        side: (lm := by_key_side.get((settings.superior_landmark, side))) is not None
        and lm.voxel_count > 0
        and FLAG_PARTIAL_TOP not in lm.flags
        for side in _SIDES
    }
    muscle_keys = {label.key for label in table.labels if not label.is_bone}
    region_cut = {
        side: any(s.side == side and s.key in muscle_keys and _cuts(s, settings, crest[side]) for s in structures)
        for side in _SIDES
    }
    return _Coverage(by_key_side, crest, region_cut, settings)


def _gaps(keys: Sequence[str], side: str, cov: _Coverage, floor_reached: bool = False) -> list[_Gap]:
    """Why the members ``keys`` on ``side`` are not covered; ``floor_reached``: the group's own
    inferior landmark is in the field of view (inferior cuts and absences do not count)."""
    gaps = []
    for key in keys:
        s = cov.by_key_side[(key, side)]
        if s.voxel_count == 0:
            if cov.region_cut[side] and not floor_reached:
                gaps.append(_Gap(key, s.name, side, ABSENT))
            continue  # a covered region: the segmentation missed it (FLAG_EMPTY), not the field of view
        whys = _cuts(s, cov.settings, cov.crest_in_view[side])
        gaps.extend(_Gap(key, s.name, side, why) for why in whys if not (floor_reached and why == CUT_INFERIOR))
    return gaps


def read_gluteal_min_reach(data: Mapping, path: object, error: type[ValueError]) -> float:
    """[group_coverage] gluteal_min_reach_mm (mm, >= 0); :data:`GLUTEAL_MIN_REACH_MM` when absent."""
    section = data.get("group_coverage", {})
    value = section.get("gluteal_min_reach_mm", GLUTEAL_MIN_REACH_MM) if isinstance(section, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise error(f"{path}: [group_coverage] gluteal_min_reach_mm = {value!r}; allowed: a number of mm >= 0")
    return float(value)


def femur_reach_mm(segmentation: Segmentation, z_axis: int, bottom_index: int, affine_lps: np.ndarray) -> dict[str, float]:
    """Per side, how far (patient z, mm) the top of the femur label lies above the inferior edge of
    the field of view (the centre of the bottom slice); 0 where the side has no femur voxel."""
    reach = {"right": 0.0, "left": 0.0}
    if FEMUR_KEY not in segmentation.labels.keys():
        return reach
    femur_id = segmentation.labels.by_key(FEMUR_KEY).id
    labels = np.moveaxis(segmentation.label_map, z_axis, 0)  # views: the slices along z, 16 at a time
    sides = np.moveaxis(segmentation.side_map, z_axis, 0)
    hits = {SIDE_RIGHT: np.zeros(labels.shape[0], dtype=bool), SIDE_LEFT: np.zeros(labels.shape[0], dtype=bool)}
    for k in range(0, labels.shape[0], 16):
        femur = labels[k:k + 16] == femur_id
        for code, hit in hits.items():
            hit[k:k + 16] = (femur & (sides[k:k + 16] == code)).any(axis=(1, 2))
    step_mm = abs(float(affine_lps[2, z_axis]))
    for side, code in (("right", SIDE_RIGHT), ("left", SIDE_LEFT)):
        indices = np.flatnonzero(hits[code])
        if indices.size:
            reach[side] = float(np.abs(indices - bottom_index).max() * step_mm)
    return reach


def _withheld_reason(gaps: Sequence[_Gap]) -> str:
    """'not reported: vastus lateralis right and left, rectus femoris right cut at the inferior
    edge of the field of view; gluteus medius left not in the field of view' ("" without gaps)."""
    if not gaps:
        return ""
    parts = []
    for why in _WHY_ORDER:
        sides: dict[str, list[str]] = {}
        for g in gaps:
            if g.why == why:
                sides.setdefault(g.name.lower(), []).append(g.side)
        if sides:
            muscles = ", ".join(f"{name} {' and '.join(dict.fromkeys(s))}" for name, s in sides.items())
            parts.append(f"{muscles} {why}")
    return "not reported: " + "; ".join(parts)


def measure_groups(
    structures: Sequence[StructureMeasurement],
    table: LabelTable,
    settings: MeasurementSettings,
    height_m: float | None,
    femur_reach: Mapping[str, float] | None = None,
) -> tuple[GroupMeasurement, ...]:
    """Totals of every group of ``settings.groups`` per side and both sides, or withheld with the
    reason when the field of view does not cover them (see the module docstring). ``femur_reach``:
    :func:`femur_reach_mm` (the gluteal group's inferior landmark; none: not used)."""
    cov = _coverage(structures, table, settings)
    reach = femur_reach or {}
    floor = {s: reach.get(s, 0.0) >= settings.gluteal_min_reach_mm for s in _SIDES}  # gluteal group only
    h2 = height_m * height_m if height_m else None
    out = []
    for name, label_groups in settings.groups:
        keys = tuple(label.key for label in table.labels if label.group in label_groups and not label.is_bone)
        for side in (*_SIDES, SIDE_BOTH):
            members = [cov.by_key_side[(k, side)] for k in keys]
            partial = any(m.is_partial for m in members)
            sides = (side,) if side != SIDE_BOTH else _SIDES
            gaps = [g for s in sides for g in _gaps(keys, s, cov, name == GROUP_GLUTEAL and floor.get(s, False))]
            if gaps:
                out.append(GroupMeasurement(
                    group=name, side=side, structure_keys=keys, volume_ml=None, mass_g=None,
                    volume_per_height2_cm3_m2=None, smi_kg_m2=None, includes_partial=partial,
                    withheld_reason=_withheld_reason(gaps),
                ))
                continue
            volume_ml = float(sum(m.volume_ml for m in members))
            mass_g = float(sum(m.mass_g for m in members))
            out.append(
                GroupMeasurement(
                    group=name,
                    side=side,
                    structure_keys=keys,
                    volume_ml=volume_ml,
                    mass_g=mass_g,
                    volume_per_height2_cm3_m2=volume_ml / h2 if h2 else None,
                    smi_kg_m2=mass_g / 1000.0 / h2 if h2 else None,
                    includes_partial=partial,
                )
            )
    return tuple(out)


def _assessment(
    group: GroupMeasurement, threshold: float, calibrated_for_ct: bool, source: str
) -> SarcopeniaAssessment:
    assert group.smi_kg_m2 is not None  # reported, height known
    return SarcopeniaAssessment(
        group=group.group,
        smi_kg_m2=group.smi_kg_m2,
        threshold_kg_m2=threshold,
        below_threshold=group.smi_kg_m2 < threshold,
        calibrated_for_ct=calibrated_for_ct,
        source=source,
    )


def assess_sarcopenia(
    groups: Sequence[GroupMeasurement], settings: MeasurementSettings, height_m: float | None, sex: str
) -> tuple[SarcopeniaAssessment | None, SarcopeniaNotAssessed | None]:
    """The screen on the configured group (both sides), or why not and what was measured instead."""
    if height_m is None:
        return None, None
    both = {g.group: g for g in groups if g.side == SIDE_BOTH}
    configured = both[settings.sarcopenia_group]
    if configured.reported:
        threshold = settings.threshold_kg_m2(sex)
        if threshold is None:
            return None, None
        return _assessment(configured, threshold, settings.calibrated_for_ct, settings.threshold_source), None
    reported = [g for g in both.values() if g.reported]
    instead = max(reported, key=lambda g: len(g.structure_keys), default=None)
    site = next((t for t in settings.group_thresholds if instead is not None and t.group == instead.group), None)
    threshold = site.for_sex(sex) if site is not None else None
    note = SarcopeniaNotAssessed(
        group=configured.group,
        reason=f"not assessed: {_GROUP_WORDS.get(configured.group, configured.group)} not fully in the field of view",
        measured_group=instead.group if instead is not None else "",
        measured_smi_kg_m2=instead.smi_kg_m2 if instead is not None else None,
        measured_threshold_applied=threshold is not None,
    )
    if instead is None or site is None or threshold is None:
        return None, note
    return _assessment(instead, threshold, site.calibrated_for_ct, site.source), note
