"""Longitudinal comparison with the prior study, over the part of the leg both scans cover.

Two CT scans of the same patient rarely cover the same length of leg: the follow-up may
stop higher on the thigh, or start lower on the pelvis. Comparing whole-scan volumes
would report the missing slab as muscle loss. This stage therefore aligns the two scans
by anatomy and compares only the range both cover, as in the hip-fracture volume-loss
paper (loss in cm³, as a ratio of the pre-operative volume, and per height² in cm³/m²;
the contralateral side shown beside the operated one).

Landmark (:data:`LANDMARK`): the top of the femoral head, per side
    The most superior patient z of the femur label on that side (the superior end of the
    largest run of consecutive slices holding femur voxels on that side), refined below
    the slice spacing by extrapolating the femur's cross-sectional area in the two top
    slices linearly to zero (a sphere's cap area grows linearly with depth), clamped to
    the slice above. It is missing on a side when the femur is absent there, or when the
    femur reaches the superior end of the field of view (the head is cut). It is
    *unreliable* on a side when metal (a prosthetic head or cup) lies within
    :data:`LANDMARK_METAL_MM` of it. Fallback: a side whose landmark is missing or
    unreliable takes the other side's when that one is found and reliable (the two femoral
    heads lie at nearly the same height; a pelvic obliquity of a few mm shifts that side's
    alignment by as much); :attr:`AnatomicalProfiles.landmark` says which side did so.
    A missing landmark with no usable other side stays None.

Profiles
    Per structure and side, one entry per slice of the structure's extent on that side
    (its most inferior to its most superior slice, in ascending z): slice-centre z relative
    to that side's landmark, area (voxels x in-plane voxel area), mean HU, voxel count and
    fat voxel count. One ``np.bincount`` over (slice, label, side) per statistic, in slabs.
    The slice axis is the array axis most aligned with patient z (it must be within
    ~25° of it: axial series); the sign of its z step gives superior/inferior, so slices
    stored superior-to-inferior come out the same.

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
      or either study's measurements flag it "metal". Volume change is kept; mean HU, fat
      fraction and mass (HU-based) are None.
    * ``compared=False``: no landmark on that side in either scan, no overlap of the two
      ranges, or the structure has no voxel inside the common range in either scan.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError
from pipeline.types import (
    FLAG_PARTIAL_COMMON_RANGE,
    FLAG_METAL,
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    SIDE_LEFT,
    SIDE_RIGHT,
    AnatomicalProfiles,
    Comparison,
    Measurements,
    Segmentation,
    StructureChange,
    StructureMeasurement,
    StructureProfile,
    Volume,
)

logger = logging.getLogger(__name__)

LANDMARK = "top of the femoral head"
FEMUR_KEY = "femur"
LANDMARK_METAL_MM = 30.0
"""Metal within this z distance of a side's landmark makes that landmark unreliable."""
MIN_AXIAL_COSINE = 0.9
"""The slice axis must make an angle of at most ~25° with patient z."""
METAL_MIN_SLICE_AREA_MM2 = 20.0
"""A slice holds metal on a side when at least this area of it is above the metal threshold."""

_SIDES: tuple[tuple[str, int], ...] = (("right", SIDE_RIGHT), ("left", SIDE_LEFT))
_N_SIDE_CODES = 3
_SLAB_VOXELS = 8_000_000
_RANGE_TOL_MM = 0.01


class CompareError(PipelineError):
    """The inputs of the comparison are inconsistent (shapes, geometry, parameters)."""


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class _Geometry:
    axis: int  # array axis most aligned with patient z
    slice_z_mm: np.ndarray  # z of each slice centre (LPS, mm), in array order
    slice_mm: float  # distance between slices along z
    voxel_mm3: float
    pixel_area_mm2: float  # voxel_mm3 / slice_mm


def _geometry(affine: np.ndarray, shape: tuple[int, int, int]) -> _Geometry:
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(norms <= 0):
        raise CompareError(f"affine_lps has a zero-length axis (column norms {norms.tolist()}); allowed: > 0 mm")
    cosines = np.abs(affine[2, :3]) / norms
    axis = int(np.argmax(cosines))
    if cosines[axis] < MIN_AXIAL_COSINE:
        raise CompareError(
            f"no array axis is aligned with patient z (best cosine {cosines[axis]:.2f} on axis {axis}); "
            f"allowed: >= {MIN_AXIAL_COSINE} (an axial series)"
        )
    others = [i for i in range(3) if i != axis]
    centre_z = affine[2, 3] + sum(affine[2, i] * (shape[i] - 1) / 2.0 for i in others)
    slice_z = centre_z + affine[2, axis] * np.arange(shape[axis], dtype=np.float64)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    slice_mm = float(abs(affine[2, axis]))
    return _Geometry(axis, slice_z, slice_mm, voxel_mm3, voxel_mm3 / slice_mm)


def _slice_stats(
    hu: np.ndarray, labels: np.ndarray, sides: np.ndarray, n_labels: int, fat_hu: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bincount over (slice, label, side) of the arrays with the slice axis first."""
    nk = hu.shape[0]
    per_slice = hu.shape[1] * hu.shape[2]
    nb = (n_labels + 1) * _N_SIDE_CODES
    count = np.zeros(nk * nb, dtype=np.int64)
    hu_sum = np.zeros(nk * nb)
    fat = np.zeros(nk * nb, dtype=np.int64)
    slab = max(1, _SLAB_VOXELS // max(1, per_slice))
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        lab = np.ascontiguousarray(labels[k0:k1]).ravel()
        fg = np.flatnonzero(lab)
        if fg.size == 0:
            continue
        idx = (fg // per_slice + k0) * nb
        idx += lab[fg].astype(np.intp) * _N_SIDE_CODES
        idx += np.ascontiguousarray(sides[k0:k1]).ravel()[fg].astype(np.intp)
        values = np.ascontiguousarray(hu[k0:k1]).ravel()[fg].astype(np.float64)
        count += np.bincount(idx, minlength=nk * nb)
        hu_sum += np.bincount(idx, weights=values, minlength=nk * nb)
        is_fat = (values >= fat_hu[0]) & (values <= fat_hu[1])
        fat += np.bincount(idx[is_fat], minlength=nk * nb)
    shape = (nk, n_labels + 1, _N_SIDE_CODES)
    return count.reshape(shape), hu_sum.reshape(shape), fat.reshape(shape)


def _voxel_x(affine: np.ndarray, axis: int, slice_idx: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """LPS x of voxels given by (slice, first other axis, second other axis) indices."""
    others = [i for i in range(3) if i != axis]
    return affine[0, 3] + affine[0, axis] * slice_idx + affine[0, others[0]] * r + affine[0, others[1]] * c


def _midline_x_mm(
    labels: np.ndarray, sides: np.ndarray, affine: np.ndarray, axis: int, femur_id: int | None
) -> float:
    """Patient midline x: between the two femora's centroids, else the centre of the labelled voxels.

    Only used to give unlabelled metal voxels a side (the structures' sides come from
    ``Segmentation.side_map``).
    """
    if femur_id is not None:
        k, r, c = np.nonzero(labels == femur_id)
        if k.size:
            x = _voxel_x(affine, axis, k, r, c)
            s = sides[k, r, c]
            right, left = x[s == SIDE_RIGHT], x[s == SIDE_LEFT]
            if right.size and left.size:
                return float(0.5 * (right.mean() + left.mean()))
    k, r, c = np.nonzero(labels)
    if k.size == 0:
        return float(_voxel_x(affine, axis, *(np.array([(n - 1) / 2.0]) for n in labels.shape))[0])
    x = _voxel_x(affine, axis, k, r, c)
    return float(0.5 * (x.min() + x.max()))


@dataclass(frozen=True)
class _Landmark:
    z_mm: float | None
    why_missing: str  # "" when found


def _find_landmark(femur_counts: np.ndarray, slice_z: np.ndarray, slice_mm: float) -> _Landmark:
    """Top of the femoral head from the femur voxel count per slice (array order) on one side."""
    order = np.argsort(slice_z)  # ascending z: inferior -> superior
    counts = femur_counts[order]
    present = counts > 0
    if not present.any():
        return _Landmark(None, "no femur on this side")
    # runs of consecutive slices with femur; keep the one with the most voxels
    edges = np.flatnonzero(np.diff(np.concatenate(([0], present.astype(np.int8), [0]))))
    starts, stops = edges[0::2], edges[1::2]
    sums = [int(counts[a:b].sum()) for a, b in zip(starts, stops)]
    best = int(np.argmax(sums))
    top = int(stops[best]) - 1
    if top == len(counts) - 1:
        return _Landmark(None, "the femur reaches the superior end of the field of view (femoral head cut)")
    z_top = float(slice_z[order[top]])
    a1 = float(counts[top])
    a2 = float(counts[top - 1]) if top - 1 >= int(starts[best]) else 0.0
    if a2 > a1:
        offset = min(max(slice_mm * a1 / (a2 - a1), 0.0), slice_mm)
    else:
        offset = 0.5 * slice_mm
    return _Landmark(z_top + offset, "")


def anatomical_profiles(
    volume: Volume,
    segmentation: Segmentation,
    *,
    fat_hu: tuple[float, float] = (-190.0, -30.0),
    metal_hu: float = 2000.0,
    metal_min_volume_ml: float = 0.1,
) -> AnatomicalProfiles:
    """Per structure and side area/HU profiles along patient z, aligned on the top of the femoral head.

    See the module docstring for the landmark rule and its fallback. ``fov_z_mm[side]``
    and ``metal_z_mm[side]`` are relative to that side's landmark (None without one);
    metal counts on a side when at least :data:`METAL_MIN_SLICE_AREA_MM2` of a slice and
    ``metal_min_volume_ml`` in all lie above ``metal_hu`` there.
    """
    t0 = time.perf_counter()
    if segmentation.label_map.shape != volume.hu.shape:
        raise CompareError(
            f"segmentation shape {segmentation.label_map.shape} differs from volume shape {volume.hu.shape}; "
            "the label map must be on the volume's grid"
        )
    if not fat_hu[0] < fat_hu[1]:
        raise CompareError(f"fat_hu is {fat_hu!r}; allowed: (minimum, maximum) with minimum < maximum")
    table = segmentation.labels
    n_labels = len(table.labels)
    max_id = int(segmentation.label_map.max()) if segmentation.label_map.size else 0
    if max_id > n_labels or int(segmentation.label_map.min()) < 0:
        raise CompareError(f"label_map holds ids up to {max_id}; the label table allows 0..{n_labels}")
    affine = volume.affine_lps
    geo = _geometry(affine, volume.hu.shape)
    hu = np.moveaxis(volume.hu, geo.axis, 0)
    labels = np.moveaxis(segmentation.label_map, geo.axis, 0)
    sides = np.moveaxis(segmentation.side_map, geo.axis, 0)
    count, hu_sum, fat = _slice_stats(hu, labels, sides, n_labels, fat_hu)

    femur_id = table.by_key(FEMUR_KEY).id if FEMUR_KEY in table.keys() else None
    found: dict[str, _Landmark] = {}
    for side, code in _SIDES:
        if femur_id is None:
            found[side] = _Landmark(None, f"the label table has no {FEMUR_KEY!r}")
        else:
            found[side] = _find_landmark(count[:, femur_id, code], geo.slice_z_mm, geo.slice_mm)

    # metal per slice and side (absolute z); sides of unlabelled metal voxels from the midline
    metal_abs: dict[str, tuple[float, float] | None] = {"right": None, "left": None}
    mk, mr, mc = np.nonzero(hu > metal_hu)
    if mk.size:
        midline = _midline_x_mm(labels, sides, _moved_affine(affine, geo.axis), 0, femur_id)
        x = _voxel_x(_moved_affine(affine, geo.axis), 0, mk, mr, mc)
        for side, left in (("right", False), ("left", True)):
            on_side = (x > midline) if left else (x <= midline)
            per_slice = np.bincount(mk[on_side], minlength=hu.shape[0])
            if per_slice.sum() * geo.voxel_mm3 / 1000.0 < metal_min_volume_ml:
                continue
            slices = np.flatnonzero(per_slice * geo.pixel_area_mm2 >= METAL_MIN_SLICE_AREA_MM2)
            if slices.size:
                z = geo.slice_z_mm[slices]
                metal_abs[side] = (float(z.min()) - geo.slice_mm / 2, float(z.max()) + geo.slice_mm / 2)

    # reliability and fallback
    notes: list[str] = []
    reliable: dict[str, bool] = {}
    for side, _ in _SIDES:
        lm, metal = found[side].z_mm, metal_abs[side]
        near_metal = (
            lm is not None and metal is not None
            and metal[0] - LANDMARK_METAL_MM <= lm <= metal[1] + LANDMARK_METAL_MM
        )
        reliable[side] = lm is not None and not near_metal
        if near_metal:
            found[side] = _Landmark(lm, f"metal within {LANDMARK_METAL_MM:g} mm of the femoral head: prosthesis")
    landmark_z: dict[str, float | None] = {}
    for side, _ in _SIDES:
        other = "left" if side == "right" else "right"
        if reliable[side]:
            landmark_z[side] = found[side].z_mm
        elif reliable[other]:
            landmark_z[side] = found[other].z_mm
            notes.append(f"{side} side taken from the {other} femoral head ({found[side].why_missing})")
        elif found[side].z_mm is not None:
            landmark_z[side] = found[side].z_mm
            notes.append(f"{side} side: {found[side].why_missing}; used anyway, no other side to fall back on")
        else:
            landmark_z[side] = None
            notes.append(f"{side} side not found ({found[side].why_missing})")
    text = "; ".join([LANDMARK, *notes])

    order = np.argsort(geo.slice_z_mm)
    z_sorted = geo.slice_z_mm[order]
    fov_lo = float(z_sorted[0]) - geo.slice_mm / 2
    fov_hi = float(z_sorted[-1]) + geo.slice_mm / 2
    fov: dict[str, tuple[float, float] | None] = {}
    metal_rel: dict[str, tuple[float, float] | None] = {}
    profiles: list[StructureProfile] = []
    for side, code in _SIDES:
        lm = landmark_z[side]
        if lm is None:
            fov[side] = None
            metal_rel[side] = None
            continue
        fov[side] = (fov_lo - lm, fov_hi - lm)
        m = metal_abs[side]
        metal_rel[side] = (m[0] - lm, m[1] - lm) if m is not None else None
        for label in table.labels:
            n = count[order, label.id, code]
            nz = np.flatnonzero(n)
            if nz.size == 0:
                continue
            sl = slice(int(nz[0]), int(nz[-1]) + 1)
            nn = n[sl]
            sums = hu_sum[order, label.id, code][sl]
            mean = np.divide(sums, nn, out=np.zeros(nn.shape), where=nn > 0)
            profiles.append(
                StructureProfile(
                    key=label.key,
                    side=side,
                    z_mm=tuple(float(z) for z in z_sorted[sl] - lm),
                    area_mm2=tuple(float(v) for v in nn * geo.pixel_area_mm2),
                    mean_hu=tuple(float(v) for v in mean),
                    voxels=tuple(int(v) for v in nn),
                    fat_voxels=tuple(int(v) for v in fat[order, label.id, code][sl]),
                    slice_mm=geo.slice_mm,
                )
            )
    logger.info(
        "anatomical profiles: %d profiles on %s voxels, landmark right=%s left=%s mm, in %.2f s",
        len(profiles), "x".join(map(str, volume.hu.shape)),
        _fmt(landmark_z["right"]), _fmt(landmark_z["left"]), time.perf_counter() - t0,
    )
    return AnatomicalProfiles(
        landmark=text,
        landmark_z_mm=landmark_z,
        fov_z_mm=fov,
        profiles=tuple(profiles),
        metal_z_mm=metal_rel,
    )


def _moved_affine(affine: np.ndarray, axis: int) -> np.ndarray:
    """The affine of the arrays after ``np.moveaxis(a, axis, 0)``."""
    cols = [axis] + [i for i in range(3) if i != axis]
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:, :3] = affine[:, cols]
    return out


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.1f}"


# --------------------------------------------------------------------------- comparison


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
) -> Comparison:
    """Change of every structure and side between ``prior`` and ``current`` over their common range.

    ``height_m`` is the current study's height (``current.height_m`` when None); the
    change per height² is None without one. See the module docstring for the range,
    the integration and the flags.
    """
    t0 = time.perf_counter()
    if not metal_margin_mm >= 0:
        raise CompareError(f"metal_margin_mm is {metal_margin_mm!r}; allowed: >= 0 mm")
    height = height_m if height_m is not None else current.height_m
    if height is not None and not 0.5 <= height <= 2.5:
        raise CompareError(f"height_m is {height!r}; allowed: 0.5 .. 2.5 m (is it in cm?)")
    h2 = height * height if height is not None else None
    cur_prof = {(p.key, p.side): p for p in current_profiles.profiles}
    pri_prof = {(p.key, p.side): p for p in prior_profiles.profiles}

    common: dict[str, tuple[float, float] | None] = {}
    side_reason: dict[str, str] = {}
    for side, _ in _SIDES:
        missing = [
            name for name, prof in (("prior", prior_profiles), ("current", current_profiles))
            if prof.landmark_z_mm.get(side) is None or prof.fov_z_mm.get(side) is None
        ]
        if missing:
            common[side] = None
            side_reason[side] = (
                "no landmark: femoral head not in the "
                + " or the ".join(f"{n} scan's" for n in missing)
                + f" field of view on the {side}"
            )
            continue
        c, p = current_profiles.fov_z_mm[side], prior_profiles.fov_z_mm[side]
        assert c is not None and p is not None
        lo, hi = max(c[0], p[0]), min(c[1], p[1])
        if hi <= lo:
            common[side] = None
            side_reason[side] = (
                f"the scans share no range on the {side}: current {c[0]:.0f}..{c[1]:.0f} mm, "
                f"prior {p[0]:.0f}..{p[1]:.0f} mm from the landmark"
            )
            continue
        common[side] = (lo, hi)

    metal_sides = [
        side for side, _ in _SIDES
        if current_profiles.metal_z_mm.get(side) is not None or prior_profiles.metal_z_mm.get(side) is not None
    ]
    operated = metal_sides[0] if len(metal_sides) == 1 else ("both" if metal_sides else "")

    changes: list[StructureChange] = []
    for side, m in _structure_keys(current, prior):
        rng = common[side]
        cm, pm = current.structure(m.key, side), prior.structure(m.key, side)
        if all(meas is None or meas.voxel_count == 0 for meas in (cm, pm)):
            continue  # found in neither study on this side: nothing to say
        if rng is None:
            changes.append(_not_compared(m, side, side_reason[side], None))
            continue
        lo, hi = rng
        cp, pp = cur_prof.get((m.key, side)), pri_prof.get((m.key, side))
        if cp is None and pp is None:
            continue  # in neither scan on this side: nothing to say
        sums = {
            name: (_integrate(prof, lo, hi) if prof is not None else None)
            for name, prof in (("current", cp), ("prior", pp))
        }
        absent = [name for name, s in sums.items() if s is None or not s.present]
        range_text = f"z {lo:.0f}..{hi:.0f} mm from the landmark"
        if absent:
            changes.append(
                _not_compared(
                    m, side, f"not present in the common range ({range_text}) of the {' and '.join(absent)} scan", rng
                )
            )
            continue
        cur, pri = sums["current"], sums["prior"]
        assert cur is not None and pri is not None
        flags: list[str] = []
        reasons: list[str] = []
        cut_by = [
            name for name, s in sums.items()
            if s is not None and (s.extent_mm[0] < lo - _RANGE_TOL_MM or s.extent_mm[1] > hi + _RANGE_TOL_MM)
        ]
        partial_meas = [
            name for name, meas in (("current", cm), ("prior", pm)) if meas is not None and meas.is_partial
        ]
        if cut_by or partial_meas:
            flags.append(FLAG_PARTIAL_COMMON_RANGE)
            why = "extends beyond it in the " + " and ".join(cut_by) + " scan" if cut_by else (
                "cut by the field of view of the " + " and ".join(partial_meas) + " scan"
            )
            reasons.append(f"compared over the common range {range_text} only ({why}); the rest is not compared")
        in_range = [
            (max(s.extent_mm[0], lo), min(s.extent_mm[1], hi)) for s in (cur, pri)
        ]
        extent = (min(r[0] for r in in_range), max(r[1] for r in in_range))
        metal_in = [
            name for name, prof in (("current", current_profiles), ("prior", prior_profiles))
            if (mz := prof.metal_z_mm.get(side)) is not None and _overlaps(extent, mz, metal_margin_mm)
        ]
        metal_meas = [
            name for name, meas in (("current", cm), ("prior", pm)) if meas is not None and FLAG_METAL in meas.flags
        ]
        metal = bool(metal_in or metal_meas)
        if metal:
            flags.append(FLAG_METAL)
            where = " and ".join(sorted(set(metal_in) | set(metal_meas)))
            reasons.append(
                f"metal within {metal_margin_mm:g} mm in the {where} scan: mean HU, fat fraction and mass "
                "changes are not given; the volume change may be affected"
            )
        change = cur.volume_ml - pri.volume_ml
        hu_values: dict[str, float | None] = {
            "prior_mass_g": pri.mass_g, "current_mass_g": cur.mass_g,
            "prior_mean_hu": pri.mean_hu, "current_mean_hu": cur.mean_hu,
            "prior_fat_fraction": pri.fat_fraction, "current_fat_fraction": cur.fat_fraction,
        }
        if metal:
            hu_values = {k: None for k in hu_values}
        changes.append(
            StructureChange(
                key=m.key, name=m.name, group=m.group, side=side, compared=True,
                reason="; ".join(reasons) or f"compared over the common range {range_text}",
                common_range_mm=rng,
                prior_volume_ml=pri.volume_ml,
                current_volume_ml=cur.volume_ml,
                change_ml=change,
                change_ratio=change / pri.volume_ml if pri.volume_ml > 0 else None,
                change_per_height2_cm3_m2=change / h2 if h2 else None,
                change_mass_g=_diff(hu_values["current_mass_g"], hu_values["prior_mass_g"]),
                change_mean_hu=_diff(hu_values["current_mean_hu"], hu_values["prior_mean_hu"]),
                change_fat_fraction=_diff(hu_values["current_fat_fraction"], hu_values["prior_fat_fraction"]),
                flags=tuple(flags),
                **hu_values,  # type: ignore[arg-type]
            )
        )

    days = interval_days(current_study_date, prior_study_date)
    if days is not None and days < 0:
        logger.warning("prior study %s is dated %d days after the current one", prior_study_uid, -days)
    method = _method(current_profiles, prior_profiles, common, side_reason)
    logger.info(
        "compared with prior %s: %d structure/side entries (%d compared), operated side %r, in %.3f s",
        prior_study_uid, len(changes), sum(c.compared for c in changes), operated, time.perf_counter() - t0,
    )
    return Comparison(
        prior_study_uid=prior_study_uid,
        prior_study_date=prior_study_date,
        current_study_date=current_study_date,
        interval_days=days,
        landmark=LANDMARK,
        method=method,
        changes=tuple(changes),
        operated_side=operated,
        height_m=height,
    )


def _method(
    current: AnatomicalProfiles,
    prior: AnatomicalProfiles,
    common: Mapping[str, tuple[float, float] | None],
    side_reason: Mapping[str, str],
) -> str:
    parts: list[str] = []
    for side, _ in _SIDES:
        rng = common[side]
        if rng is None:
            parts.append(f"nothing on the {side} ({side_reason[side]})")
        else:
            parts.append(f"z {rng[0]:.0f}..{rng[1]:.0f} mm ({side})")
    notes = [
        f"{name} scan, {p.landmark[len(LANDMARK):].lstrip('; ')}"
        for name, p in (("current", current), ("prior", prior))
        if p.landmark.startswith(LANDMARK) and p.landmark != LANDMARK
    ]
    text = (
        f"Aligned on the {LANDMARK} per side; compared over the common range "
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
    "anatomical_profiles",
    "compare_studies",
    "interval_days",
)
