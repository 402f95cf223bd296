"""Longitudinal comparison with the prior study, over the part of the leg both scans cover.

Two CT scans of the same patient rarely cover the same length of leg: the follow-up may
stop higher on the thigh, or start lower on the pelvis. Comparing whole-scan volumes
would report the missing slab as muscle loss. This stage therefore aligns the two scans
by anatomy and compares only the range both cover, as in the hip-fracture volume-loss
paper (loss in cm³, as a ratio of the pre-operative volume, and per height² in cm³/m²;
the contralateral side shown beside the operated one). The alignment, the landmark
and the profiles each study keeps are those of :mod:`pipeline.profiles`.

Alignment per side
    On the landmark (the top of the femoral head, after pipeline.profiles' other-side fallback)
    when both studies have a reliable one there: z is relative to it. Otherwise - the landmark
    missing in either study, or unreliable (metal within 30 mm of it on both sides: a prosthesis
    or screws move the top of what the model calls femur by centimetres) in either - by the
    model-free bone-profile registration of :mod:`pipeline.boneshift` when both studies kept bone profiles:
    both scans' profiles are placed on the current scan's absolute patient z (the prior's moved
    by the registration's shift), and the common range below is in that z. A failed registration
    leaves the side not compared with the registration's reason (correlation, overlap), except
    that unreliable landmarks are then used as before. Profiles stored before bone
    profiles existed offer no registration: the side is not compared, as before.

Common-range integration (:func:`compare_studies`)
    Per side the common range is the intersection of the two scans' ``fov_z_mm`` (each
    scan covers its first slice centre - spacing/2 to its last + spacing/2). A slice i
    with centre z_i and spacing t covers [z_i - t/2, z_i + t/2]; it contributes the
    fraction f_i = overlap([z_i - t/2, z_i + t/2], range) / t of its content: volume
    Σ f_i·area_i·t, voxels Σ f_i·N_i, mass Σ f_i·V_voxel·N_i·(1 + meanHU_i/1000) (the
    linear density formula of pipeline.measure applied per slice, exact), mean HU and
    fat fraction as voxel-weighted means over the same range. Scans with different slice
    spacings thus integrate the same anatomy.

Flags of a :class:`StructureChange`
    * ``partial_common_range``: the structure extends beyond the common range in either
      scan (one scan's shorter field of view cut it), or either study's measurements flag
      it partial_fov_top/bottom. It is compared over the common range only (``reason``
      gives the range); what lies outside is never counted as loss.
    * ``metal``: metal (voxels above ``metal_hu``) on the structure's side in either scan
      lies within ``metal_margin_mm`` of the structure's z extent inside the common range,
      or either study's measurements flag it "metal". Mean HU, fat fraction and mass (HU-based)
      are None; the volume change is kept unless the structure is withheld (below).
    * metal withholding (``compared=False``, flag ``metal`` kept), in either scan:
      - at least ``metal_withhold_near_pct`` % of the structure's voxels on that side lie within
        the measurement's ``metal_proximity_mm`` of metal (``StructureMeasurement.near_metal_voxels``
        over ``voxel_count``, pipeline.measure), or
      - at least ``metal_withhold_slices_pct`` % of its voxels inside the common range, as either
        scan segments it, lie in slices that hold metal on either side in either scan
        (``AnatomicalProfiles.metal_z_mm``, on the side's common axis; :func:`metal_slices_pct`):
        streaks run across the whole slice, through both legs, and a model that loses a muscle in
        them leaves few of its voxels there in the scan with metal, the other scan still shows them.
      Near an implant and in its streaks the segmentation cannot be trusted, and a false loss
      shown as a number is worse than no number: the change is not given and ``reason`` gives
      the share, where and the scan. Measured quantities only; the default thresholds were chosen
      on phantom pairs (``thighnode evaluate-implants``, modelkit.implant_pairs).
    * field-of-view withholding (``withhold_partial``, the node's ``[prior] withhold_partial``, default
      on; ``compared=False``, flag ``partial_common_range`` kept): a structure flagged partial as above
      has no change either. Near the cut the model's outline is least reliable: on implant phantom
      pairs (demo bundle 0.9.0, seed 17) 24 of 96 changes of cut structures were off by > 5 pp (up to
      23 pp: the trunk muscles at the top of the scan, iliacus, psoas), 0 of 26 of whole ones.
    * ``compared=False`` (also): no landmark on that side in either scan and no bone-profile
      registration (or a failed one), no overlap of the two ranges, or the structure has no
      voxel inside the common range in either scan.

Muscle groups (:func:`compare_groups`)
    A group (gluteal, above knee, all; per side and both) is compared only when it is reported
    in both studies (pipeline.measure withholds a group whose muscles the field of view does not
    cover, pipeline.groups) and every member found in either study was compared; its change is
    the sum of its members' changes over the common range. Otherwise ``compared`` is False and
    the reason names the study and why (the group's own withheld reason, or the members not
    compared). Structures keep the rules above.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.alignment import Alignment as _Alignment
from pipeline.alignment import align as _align
from pipeline.alignment import aligned_profiles
from pipeline.boneshift import METHOD as BONE_METHOD
from pipeline.profiles import LANDMARK, SIDES, CompareError, anatomical_profiles
from pipeline.types import (
    FLAG_METAL,
    FLAG_PARTIAL_COMMON_RANGE,
    SIDE_BOTH,
    AnatomicalProfiles,
    Comparison,
    GroupChange,
    GroupMeasurement,
    Measurements,
    StructureChange,
    StructureMeasurement,
    StructureProfile,
)

logger = logging.getLogger(__name__)

_RANGE_TOL_MM = 0.01
METAL_WITHHOLD_NEAR_PCT = 7.0
"""Default share (%) of a structure's voxels near metal from which its volume change is withheld
(config/node.toml prior.metal_withhold_near_pct; chosen on calibration phantom pairs)."""
METAL_WITHHOLD_SLICES_PCT = 1.0
"""Default share (%) of a structure's voxels in slices holding metal from which its volume change is
withheld (config/node.toml prior.metal_withhold_slices_pct; chosen on calibration phantom pairs)."""


@dataclass(frozen=True)
class _RangeSums:
    volume_ml: float
    voxels: float  # fractional: partial slices at the range ends
    hu_sum: float
    fat_voxels: float
    mass_g: float
    extent_mm: tuple[float, float]  # the structure's z extent (whole profile, slice edges)

    @property
    def present(self) -> bool:
        return self.voxels > 0

    @property
    def mean_hu(self) -> float:
        return self.hu_sum / self.voxels

    @property
    def fat_fraction(self) -> float:
        return self.fat_voxels / self.voxels


def _integrate(profile: StructureProfile, lo: float, hi: float) -> _RangeSums:
    """The profile's content over [lo, hi] mm (relative z), with partial slices at the ends."""
    t = profile.slice_mm
    z = np.asarray(profile.z_mm, dtype=np.float64)
    frac = np.clip((np.minimum(z + t / 2, hi) - np.maximum(z - t / 2, lo)) / t, 0.0, 1.0)
    area = np.asarray(profile.area_mm2, dtype=np.float64)
    n = np.asarray(profile.voxels, dtype=np.float64)
    mean = np.asarray(profile.mean_hu, dtype=np.float64)
    fat = np.asarray(profile.fat_voxels, dtype=np.float64)
    volume_mm3 = frac * area * t
    return _RangeSums(
        volume_ml=float(volume_mm3.sum()) / 1000.0,
        voxels=float((frac * n).sum()),
        hu_sum=float((frac * n * mean).sum()),
        fat_voxels=float((frac * fat).sum()),
        mass_g=float((volume_mm3 * (1.0 + mean / 1000.0)).sum()) / 1000.0,
        extent_mm=(float(z[0] - t / 2), float(z[-1] + t / 2)) if z.size else (0.0, 0.0),
    )


def interval_days(current_study_date: str, prior_study_date: str) -> int | None:
    """Days from the prior StudyDate to the current one (YYYYMMDD); None if either is missing or invalid."""
    try:
        cur = _dt.datetime.strptime(current_study_date.strip(), "%Y%m%d").date()
        pri = _dt.datetime.strptime(prior_study_date.strip(), "%Y%m%d").date()
    except (ValueError, AttributeError):
        return None
    return (cur - pri).days


def _overlaps(a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    return a[0] <= b[1] + margin and b[0] <= a[1] + margin


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _not_compared(
    m: StructureMeasurement, side: str, reason: str, common: tuple[float, float] | None, flags: tuple[str, ...] = ()
) -> StructureChange:
    return StructureChange(
        key=m.key, name=m.name, group=m.group, side=side, compared=False, reason=reason,
        common_range_mm=common, prior_volume_ml=None, current_volume_ml=None, change_ml=None,
        change_ratio=None, change_per_height2_cm3_m2=None, prior_mass_g=None, current_mass_g=None,
        change_mass_g=None, prior_mean_hu=None, current_mean_hu=None, change_mean_hu=None,
        prior_fat_fraction=None, current_fat_fraction=None, change_fat_fraction=None, flags=flags,
    )


def _structure_keys(current: Measurements, prior: Measurements) -> list[tuple[str, StructureMeasurement]]:
    """(side, a measurement giving key/name/group) for every left/right structure of either study."""
    out: dict[tuple[str, str], StructureMeasurement] = {}
    for m in (*current.structures, *prior.structures):
        if m.side in ("right", "left") and (m.key, m.side) not in out:
            out[(m.key, m.side)] = m
    return [(side, m) for (_, side), m in out.items()]


@dataclass(frozen=True)
class _Context:
    """What the comparison of every structure and side shares."""

    current: Measurements
    prior: Measurements
    current_profiles: AnatomicalProfiles
    prior_profiles: AnatomicalProfiles
    common: Mapping[str, tuple[float, float] | None]  # per side, on the side's axis (mm); None: not compared
    side_reason: Mapping[str, str]  # per side without a common range: why
    axis_text: Mapping[str, str]  # per side: what the common range's z is measured from
    metal_margin_mm: float
    metal_withhold_near_pct: float | None  # None: never withheld (evaluations: the rule's effect)
    metal_withhold_slices_pct: float | None  # None: never withheld
    withhold_partial: bool  # a structure cut by either scan's field of view: change withheld
    height2_m2: float | None
    profiles_by_key: Mapping[str, Mapping[tuple[str, str], StructureProfile]]  # study -> (key, side) -> profile


def compare_studies(
    current: Measurements,
    current_profiles: AnatomicalProfiles,
    prior: Measurements,
    prior_profiles: AnatomicalProfiles,
    *,
    current_study_date: str,
    prior_study_date: str,
    prior_study_uid: str,
    height_m: float | None,
    metal_margin_mm: float = 30.0,
    metal_withhold_near_pct: float | None = METAL_WITHHOLD_NEAR_PCT,
    metal_withhold_slices_pct: float | None = METAL_WITHHOLD_SLICES_PCT,
    withhold_partial: bool = False,
) -> Comparison:
    """Change of every structure and side between ``prior`` and ``current`` over their common range.

    ``height_m`` is the current study's height (``current.height_m`` when None); the
    change per height² is None without one. ``metal_withhold_near_pct`` (0 < x <= 100): the share
    of a structure's voxels near metal from which its change is withheld (None: never; for
    evaluations that show the rule's effect); ``metal_withhold_slices_pct`` likewise for the share
    in slices holding metal. ``withhold_partial``: a structure either scan's field of view cuts
    (flag partial_common_range) has its change withheld too (the node's ``[prior] withhold_partial``).
    See the module docstring for the range, the integration, the flags and the withholding.
    """
    t0 = time.perf_counter()
    height = height_m if height_m is not None else current.height_m
    _check_arguments(metal_margin_mm, metal_withhold_near_pct, metal_withhold_slices_pct, height)
    alignment = _align(current_profiles, prior_profiles)
    current_profiles, prior_profiles = aligned_profiles(current_profiles, prior_profiles, alignment)
    common, side_reason = _common_ranges(current_profiles, prior_profiles, alignment)
    ctx = _Context(
        current=current,
        prior=prior,
        current_profiles=current_profiles,
        prior_profiles=prior_profiles,
        common=common,
        side_reason=side_reason,
        axis_text={side: a.axis_text for side, a in alignment.items()},
        metal_margin_mm=metal_margin_mm,
        metal_withhold_near_pct=metal_withhold_near_pct,
        metal_withhold_slices_pct=metal_withhold_slices_pct,
        withhold_partial=withhold_partial,
        height2_m2=height * height if height is not None else None,
        profiles_by_key={
            name: {(p.key, p.side): p for p in prof.profiles}
            for name, prof in (("current", current_profiles), ("prior", prior_profiles))
        },
    )
    metal_sides = [
        side for side, _ in SIDES
        if current_profiles.metal_z_mm.get(side) is not None or prior_profiles.metal_z_mm.get(side) is not None
    ]
    operated = metal_sides[0] if len(metal_sides) == 1 else ("both" if metal_sides else "")
    changes: list[StructureChange] = []
    for side, m in _structure_keys(current, prior):
        change = _compare_structure(m, side, ctx)
        if change is not None:
            changes.append(change)

    days = interval_days(current_study_date, prior_study_date)
    if days is not None and days < 0:
        logger.warning("prior study %s is dated %d days after the current one", prior_study_uid, -days)
    method = _method(current_profiles, prior_profiles, common, side_reason, alignment)
    logger.info(
        "compared with prior %s: %d structure/side entries (%d compared), operated side %r, in %.3f s",
        prior_study_uid, len(changes), sum(c.compared for c in changes), operated, time.perf_counter() - t0,
    )
    return Comparison(
        prior_study_uid=prior_study_uid,
        prior_study_date=prior_study_date,
        current_study_date=current_study_date,
        interval_days=days,
        landmark=_landmark_text(alignment, common),
        method=method,
        changes=tuple(changes),
        operated_side=operated,
        height_m=height,
        axis_text={side: a.axis_text for side, a in alignment.items()},
    )


def _check_arguments(
    metal_margin_mm: float, near_pct: float | None, slices_pct: float | None, height_m: float | None
) -> None:
    if not metal_margin_mm >= 0:
        raise CompareError(f"metal_margin_mm is {metal_margin_mm!r}; allowed: >= 0 mm")
    for name, pct in (("metal_withhold_near_pct", near_pct), ("metal_withhold_slices_pct", slices_pct)):
        if pct is not None and not 0 < pct <= 100:
            raise CompareError(f"{name} is {pct!r}; allowed: 0 < x <= 100 (%) or None (never withheld)")
    if height_m is not None and not 0.5 <= height_m <= 2.5:
        raise CompareError(f"height_m is {height_m!r}; allowed: 0.5 .. 2.5 m (is it in cm?)")


def _common_ranges(
    current: AnatomicalProfiles, prior: AnatomicalProfiles, alignment: Mapping[str, _Alignment]
) -> tuple[dict[str, tuple[float, float] | None], dict[str, str]]:
    """Per side, the z range (on that side's common axis) both scans cover, or None and why."""
    common: dict[str, tuple[float, float] | None] = {}
    side_reason: dict[str, str] = {}
    for side, _ in SIDES:
        if not alignment[side].by:
            common[side] = None
            side_reason[side] = alignment[side].reason
            continue
        c, p = current.fov_z_mm[side], prior.fov_z_mm[side]
        assert c is not None and p is not None
        lo, hi = max(c[0], p[0]), min(c[1], p[1])
        if hi <= lo:
            common[side] = None
            side_reason[side] = (
                f"the scans share no range on the {side}: current {c[0]:.0f}..{c[1]:.0f} mm, "
                f"prior {p[0]:.0f}..{p[1]:.0f} mm {alignment[side].axis_text}"
            )
            continue
        common[side] = (lo, hi)
    return common, side_reason


def _compare_structure(m: StructureMeasurement, side: str, ctx: _Context) -> StructureChange | None:
    """The change of one structure on one side over the common range; None when neither study has it."""
    rng = ctx.common[side]
    meas = {"current": ctx.current.structure(m.key, side), "prior": ctx.prior.structure(m.key, side)}
    if all(x is None or x.voxel_count == 0 for x in meas.values()):
        return None  # found in neither study on this side: nothing to say
    if rng is None:
        return _not_compared(m, side, ctx.side_reason[side], None)
    lo, hi = rng
    profiles = {name: ctx.profiles_by_key[name].get((m.key, side)) for name in ("current", "prior")}
    if all(prof is None for prof in profiles.values()):
        return None  # in neither scan on this side: nothing to say
    sums = {name: (_integrate(prof, lo, hi) if prof is not None else None) for name, prof in profiles.items()}
    absent = [name for name, s in sums.items() if s is None or not s.present]
    range_text = f"z {lo:.0f}..{hi:.0f} mm {ctx.axis_text[side]}"
    if absent:
        return _not_compared(
            m, side, f"not present in the common range ({range_text}) of the {' and '.join(absent)} scan", rng
        )
    cur, pri = sums["current"], sums["prior"]
    assert cur is not None and pri is not None
    flags: list[str] = []
    reasons: list[str] = []
    partial = _partial_why(sums, meas, rng)
    if partial:
        flags.append(FLAG_PARTIAL_COMMON_RANGE)
        reasons.append(_partial_reason(partial, range_text, withheld=False))
    metal = _metal_reason(side, (cur, pri), meas, rng, ctx)
    if metal:
        flags.append(FLAG_METAL)
        reasons.append(metal)
    withheld = _metal_withhold_reason(meas, ctx) or _metal_slices_reason(m.key, side, rng, ctx)
    if partial and ctx.withhold_partial and not withheld:
        reasons[0] = _partial_reason(partial, range_text, withheld=True)
        return _not_compared(m, side, "; ".join(reasons), rng, tuple(flags))
    if withheld:
        if FLAG_METAL not in flags:
            flags.append(FLAG_METAL)
        return _not_compared(m, side, "; ".join([withheld, *(r for r in reasons if r != metal)]), rng, tuple(flags))
    change = cur.volume_ml - pri.volume_ml
    hu_values: dict[str, float | None] = {
        "prior_mass_g": pri.mass_g, "current_mass_g": cur.mass_g,
        "prior_mean_hu": pri.mean_hu, "current_mean_hu": cur.mean_hu,
        "prior_fat_fraction": pri.fat_fraction, "current_fat_fraction": cur.fat_fraction,
    }
    if metal:
        hu_values = {k: None for k in hu_values}
    return StructureChange(
        key=m.key, name=m.name, group=m.group, side=side, compared=True,
        reason="; ".join(reasons) or f"compared over the common range {range_text}",
        common_range_mm=rng,
        prior_volume_ml=pri.volume_ml,
        current_volume_ml=cur.volume_ml,
        change_ml=change,
        change_ratio=change / pri.volume_ml if pri.volume_ml > 0 else None,
        change_per_height2_cm3_m2=change / ctx.height2_m2 if ctx.height2_m2 else None,
        change_mass_g=_diff(hu_values["current_mass_g"], hu_values["prior_mass_g"]),
        change_mean_hu=_diff(hu_values["current_mean_hu"], hu_values["prior_mean_hu"]),
        change_fat_fraction=_diff(hu_values["current_fat_fraction"], hu_values["prior_fat_fraction"]),
        flags=tuple(flags),
        **hu_values,  # type: ignore[arg-type]
    )


def _partial_why(
    sums: Mapping[str, _RangeSums | None],
    meas: Mapping[str, StructureMeasurement | None],
    rng: tuple[float, float],
) -> str:
    """Why the structure is compared over part of it only (flag partial_common_range), or ""."""
    lo, hi = rng
    cut_by = [
        name for name, s in sums.items()
        if s is not None and (s.extent_mm[0] < lo - _RANGE_TOL_MM or s.extent_mm[1] > hi + _RANGE_TOL_MM)
    ]
    partial_meas = [name for name, x in meas.items() if x is not None and x.is_partial]
    if not (cut_by or partial_meas):
        return ""
    return "extends beyond it in the " + " and ".join(cut_by) + " scan" if cut_by else (
        "cut by the field of view of the " + " and ".join(partial_meas) + " scan"
    )


def _partial_reason(why: str, range_text: str, withheld: bool) -> str:
    """The reason text of a partial structure: compared over the common range only, or (``withheld``,
    ``[prior] withhold_partial``) not compared at all."""
    if withheld:
        return (
            f"the field of view cuts it (common range {range_text}; {why}): near the cut the model's outline is "
            "unreliable (phantom pairs: README, Implants at follow-up), so the change is not shown "
            "([prior] withhold_partial)"
        )
    return f"compared over the common range {range_text} only ({why}); the rest is not compared"


def _metal_reason(
    side: str,
    sums: tuple[_RangeSums, _RangeSums],
    meas: Mapping[str, StructureMeasurement | None],
    rng: tuple[float, float],
    ctx: _Context,
) -> str:
    """Why HU-based changes are withheld (flag metal: metal near the structure in either scan), or ""."""
    lo, hi = rng
    in_range = [(max(s.extent_mm[0], lo), min(s.extent_mm[1], hi)) for s in sums]
    extent = (min(r[0] for r in in_range), max(r[1] for r in in_range))
    metal_in = [
        name for name, prof in (("current", ctx.current_profiles), ("prior", ctx.prior_profiles))
        if (mz := prof.metal_z_mm.get(side)) is not None and _overlaps(extent, mz, ctx.metal_margin_mm)
    ]
    metal_meas = [name for name, x in meas.items() if x is not None and FLAG_METAL in x.flags]
    if not (metal_in or metal_meas):
        return ""
    where = " and ".join(sorted(set(metal_in) | set(metal_meas)))
    return (
        f"metal within {ctx.metal_margin_mm:g} mm in the {where} scan: mean HU, fat fraction and mass "
        "changes are not given; the volume change may be affected"
    )


def _metal_withhold_reason(meas: Mapping[str, StructureMeasurement | None], ctx: _Context) -> str:
    """Why the volume change is withheld near metal (module docstring), or ""."""
    if ctx.metal_withhold_near_pct is None:
        return ""
    studies = {"current": ctx.current, "prior": ctx.prior}
    worst: tuple[float, str] | None = None
    for name, x in meas.items():
        if x is None or x.voxel_count <= 0 or x.near_metal_voxels <= 0:
            continue
        pct = 100.0 * x.near_metal_voxels / x.voxel_count
        if pct >= ctx.metal_withhold_near_pct and (worst is None or pct > worst[0]):
            worst = (pct, name)
    if worst is None:
        return ""
    pct, name = worst
    return (
        f"metal within {studies[name].metal_proximity_mm:g} mm of {pct:.0f} % of its voxels in the {name} scan "
        f"(withheld from {ctx.metal_withhold_near_pct:g} %): its volume cannot be trusted and the change is not shown"
    )


def metal_slices_share(profile: StructureProfile, rng: tuple[float, float],
                       metal_z_mm: Sequence[tuple[float, float]]) -> float:
    """Share (0..1) of the profile's voxels inside ``rng`` (partial end slices weighted) whose slice
    centre lies in one of the ``metal_z_mm`` ranges (relative z, slice edges)."""
    t = profile.slice_mm
    z = np.asarray(profile.z_mm, dtype=np.float64)
    lo, hi = rng
    n = np.asarray(profile.voxels, dtype=np.float64) * np.clip(
        (np.minimum(z + t / 2, hi) - np.maximum(z - t / 2, lo)) / t, 0.0, 1.0)
    in_metal = np.zeros(z.shape, dtype=bool)
    for m0, m1 in metal_z_mm:
        in_metal |= (z >= m0) & (z <= m1)
    total = float(n.sum())
    return float(n[in_metal].sum()) / total if total > 0 else 0.0


def metal_slices_pct(
    current: AnatomicalProfiles, prior: AnatomicalProfiles, key: str, side: str, rng: tuple[float, float]
) -> tuple[float, str, str]:
    """(share %, scan, metal scans): the largest share of the structure's voxels on ``side`` inside ``rng``,
    as either scan segments it, that lies in slices holding metal (either side) in either scan.

    Both scans' metal counts for both profiles: a model that loses a muscle in the streaks leaves
    few of its voxels there in the scan with metal, but the other scan still shows where it lies.
    """
    studies = {"current": current, "prior": prior}
    metal_in = [name for name, prof in studies.items() if any(r is not None for r in prof.metal_z_mm.values())]
    metal = [r for name in metal_in for r in studies[name].metal_z_mm.values() if r is not None]
    best = (0.0, "", " and ".join(metal_in))
    if not metal:
        return best
    for name, prof in studies.items():
        p = next((p for p in prof.profiles if p.key == key and p.side == side), None)
        if p is not None:
            pct = 100.0 * metal_slices_share(p, rng, metal)
            if pct > best[0]:
                best = (pct, name, best[2])
    return best


def _metal_slices_reason(key: str, side: str, rng: tuple[float, float], ctx: _Context) -> str:
    """Why the volume change is withheld in the slices of metal's streaks (module docstring), or ""."""
    if ctx.metal_withhold_slices_pct is None:
        return ""
    pct, name, metal_in = metal_slices_pct(ctx.current_profiles, ctx.prior_profiles, key, side, rng)
    if not metal_in or pct < ctx.metal_withhold_slices_pct:
        return ""
    return (
        f"{pct:.0f} % of its voxels (as the {name} scan shows it) lie in slices with metal in the {metal_in} scan "
        f"(streaks; withheld from {ctx.metal_withhold_slices_pct:g} %): its volume cannot be trusted and the change "
        "is not shown"
    )


def _group_not_compared(g: GroupMeasurement, reason: str) -> GroupChange:
    return GroupChange(
        group=g.group, side=g.side, compared=False, reason=reason, structure_keys=g.structure_keys,
        prior_volume_ml=None, current_volume_ml=None, change_ml=None, change_ratio=None,
        change_per_height2_cm3_m2=None, change_mass_g=None,
    )


def _group_change(g: GroupMeasurement, prior: GroupMeasurement | None, comparison: Comparison) -> GroupChange:
    if not g.reported:
        return _group_not_compared(g, f"not compared: {g.withheld_reason} in the current study")
    if prior is None or not prior.reported:
        why = prior.withheld_reason if prior is not None else "not reported"
        return _group_not_compared(g, f"not compared: {why} in the prior study")
    sides = ("right", "left") if g.side == SIDE_BOTH else (g.side,)
    members = [c for key in g.structure_keys for side in sides if (c := comparison.change(key, side)) is not None]
    skipped = [c for c in members if not c.compared]
    if skipped:
        names = ", ".join(f"{c.name.lower()} {c.side} ({c.reason})" for c in skipped)
        return _group_not_compared(g, f"not compared: {names}")
    prior_ml = float(sum(c.prior_volume_ml for c in members))  # type: ignore[misc]
    current_ml = float(sum(c.current_volume_ml for c in members))  # type: ignore[misc]
    change = current_ml - prior_ml
    h2 = comparison.height_m**2 if comparison.height_m else None
    masses = [c.change_mass_g for c in members]
    partial = any(FLAG_PARTIAL_COMMON_RANGE in c.flags for c in members)
    return GroupChange(
        group=g.group, side=g.side, compared=True,
        reason="sum of its muscles' changes over the common range"
        + (" (some compared over part of their length only)" if partial else ""),
        structure_keys=g.structure_keys,
        prior_volume_ml=prior_ml,
        current_volume_ml=current_ml,
        change_ml=change,
        change_ratio=change / prior_ml if prior_ml > 0 else None,
        change_per_height2_cm3_m2=change / h2 if h2 else None,
        change_mass_g=float(sum(masses)) if all(m is not None for m in masses) else None,  # type: ignore[arg-type]
    )


def compare_groups(current: Measurements, prior: Measurements, comparison: Comparison) -> tuple[GroupChange, ...]:
    """The change of every group of ``current`` (see the module docstring): compared only when
    reported in both studies, from the structure changes of ``comparison``."""
    return tuple(_group_change(g, prior.group(g.group, g.side), comparison) for g in current.groups)


def _landmark_text(alignment: Mapping[str, _Alignment], common: Mapping[str, tuple[float, float] | None]) -> str:
    """The Comparison's alignment landmark: the femoral head, or which sides the bone profiles aligned."""
    bone = [side for side, _ in SIDES if alignment[side].by == BONE_METHOD and common[side] is not None]
    if not bone:
        return LANDMARK
    if len(bone) == 2:
        return f"{BONE_METHOD} (no usable {LANDMARK})"
    other = "left" if bone[0] == "right" else "right"
    return f"{LANDMARK} ({other}); {BONE_METHOD} ({bone[0]})"


def _method(
    current: AnatomicalProfiles,
    prior: AnatomicalProfiles,
    common: Mapping[str, tuple[float, float] | None],
    side_reason: Mapping[str, str],
    alignment: Mapping[str, _Alignment],
) -> str:
    parts: list[str] = []
    for side, _ in SIDES:
        rng = common[side]
        if rng is None:
            parts.append(f"nothing on the {side} ({side_reason[side]})")
        elif alignment[side].by == BONE_METHOD:
            parts.append(f"z {rng[0]:.0f}..{rng[1]:.0f} mm ({side}, {alignment[side].axis_text})")
        else:
            parts.append(f"z {rng[0]:.0f}..{rng[1]:.0f} mm ({side})")
    notes = [
        f"{name} scan, {p.landmark[len(LANDMARK):].lstrip('; ')}"
        for name, p in (("current", current), ("prior", prior))
        if p.landmark.startswith(LANDMARK) and p.landmark != LANDMARK
    ]
    text = (
        f"Aligned on the {LANDMARK} per side"
        + (f" (else by {BONE_METHOD})" if any(a.by == BONE_METHOD for a in alignment.values()) else "")
        + "; compared over the common range "
        + " and ".join(parts)
        + " covered by both scans, volumes integrated slice by slice with partial slices at the range ends"
    )
    if notes:
        text += " (landmark: " + "; ".join(notes) + ")"
    return text + "."


__all__: Sequence[str] = (
    "LANDMARK",
    "FLAG_PARTIAL_COMMON_RANGE",
    "CompareError",
    "aligned_profiles",
    "anatomical_profiles",
    "compare_groups",
    "compare_studies",
    "interval_days",
)
