"""Anatomical profiles of one study along patient z, aligned on the top of the femoral head.

What a study keeps for its later comparison with a follow-up (:mod:`pipeline.compare`):
per structure and side, area and HU slice by slice, with z measured from an anatomical
landmark, so that two scans covering different lengths of leg can be aligned.

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

Bone profiles (model-free, for :mod:`pipeline.boneshift`)
    Per side, per slice (ascending absolute patient z of the slice centre): the area (mm²) of the
    voxels with :data:`BONE_HU` <= HU <= ``metal_hu`` on that side of the body midline (the one
    that gives unlabelled metal its side), and whether the slice holds metal on that side (at
    least :data:`METAL_MIN_SLICE_AREA_MM2` above ``metal_hu``; such slices are left out of the
    registration). One pass over the volume in slabs. A side without a landmark keeps its
    structure profiles, field of view and metal range in absolute patient z (relative to z = 0)
    so that the bone-profile registration can place them on the other scan's axis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError
from pipeline.labels import FEMUR_KEY, LabelTable
from pipeline.types import (
    SIDE_LEFT,
    SIDE_RIGHT,
    AnatomicalProfiles,
    Segmentation,
    BoneProfile,
    StructureProfile,
    Volume,
)

logger = logging.getLogger(__name__)

LANDMARK = "top of the femoral head"
LANDMARK_METAL_MM = 30.0
"""Metal within this z distance of a side's landmark makes that landmark unreliable."""
MIN_AXIAL_COSINE = 0.9
"""The slice axis must make an angle of at most ~25° with patient z."""
METAL_MIN_SLICE_AREA_MM2 = 20.0
"""A slice holds metal on a side when at least this area of it is above the metal threshold."""
BONE_HU = 200.0
"""Lower end of the bone window of the bone profiles (cancellous bone and cortex; muscle, fat and
contrast-free vessels lie below)."""

SIDES: tuple[tuple[str, int], ...] = (("right", SIDE_RIGHT), ("left", SIDE_LEFT))
"""(side name, Segmentation.side_map code) of the two sides, right first."""
_N_SIDE_CODES = 3
_SLAB_VOXELS = 8_000_000


class CompareError(PipelineError):
    """The inputs of the comparison are inconsistent (shapes, geometry, parameters)."""


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
        femur = labels == femur_id
        centroids = [_mean_x(femur & (sides == code), affine, axis) for code in (SIDE_RIGHT, SIDE_LEFT)]
        if all(x is not None for x in centroids):
            return float(0.5 * (centroids[0] + centroids[1]))  # type: ignore[operator]
    k, r, c = np.nonzero(labels)
    if k.size == 0:
        return float(_voxel_x(affine, axis, *(np.array([(n - 1) / 2.0]) for n in labels.shape))[0])
    x = _voxel_x(affine, axis, k, r, c)
    return float(0.5 * (x.min() + x.max()))


def _mean_x(mask: np.ndarray, affine: np.ndarray, axis: int) -> float | None:
    """Mean LPS x of the voxels of ``mask`` (None when empty): x is linear in the indices, so it is
    the x of the mean index, from three axis sums (no index arrays of every voxel)."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return None
    mean_idx = [
        float(np.count_nonzero(mask, axis=tuple(j for j in range(3) if j != i)) @ np.arange(mask.shape[i])) / n
        for i in range(3)
    ]
    others = [i for i in range(3) if i != axis]
    return float(_voxel_x(affine, axis, *(np.array([mean_idx[i]]) for i in (axis, *others)))[0])


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

    See the module docstring for the landmark rule and its fallback, and for the bone
    profiles. ``fov_z_mm[side]``, ``metal_z_mm[side]`` and the profiles' z are relative to
    that side's landmark (absolute patient z without one);
    metal counts on a side when at least :data:`METAL_MIN_SLICE_AREA_MM2` of a slice and
    ``metal_min_volume_ml`` in all lie above ``metal_hu`` there.
    """
    t0 = time.perf_counter()
    _check_profile_inputs(volume, segmentation, fat_hu)
    table = segmentation.labels
    affine = volume.affine_lps
    geo = _geometry(affine, volume.hu.shape)
    hu = np.moveaxis(volume.hu, geo.axis, 0)
    labels = np.moveaxis(segmentation.label_map, geo.axis, 0)
    sides = np.moveaxis(segmentation.side_map, geo.axis, 0)
    count, hu_sum, fat = _slice_stats(hu, labels, sides, len(table.labels), fat_hu)

    femur_id = table.by_key(FEMUR_KEY).id if FEMUR_KEY in table.keys() else None
    found: dict[str, _Landmark] = {}
    for side, code in SIDES:
        if femur_id is None:
            found[side] = _Landmark(None, f"the label table has no {FEMUR_KEY!r}")
        else:
            found[side] = _find_landmark(count[:, femur_id, code], geo.slice_z_mm, geo.slice_mm)
    moved = _moved_affine(affine, geo.axis)
    midline = _midline_x_mm(labels, sides, moved, 0, femur_id)
    metal_abs = _metal_z_mm(hu > metal_hu, midline, moved, geo, metal_min_volume_ml)
    landmark_z, reliable, notes = _choose_landmarks(found, metal_abs)
    bone = _bone_profiles(hu, moved, midline, geo, metal_hu)

    order = np.argsort(geo.slice_z_mm)
    z_sorted = geo.slice_z_mm[order]
    fov_lo = float(z_sorted[0]) - geo.slice_mm / 2
    fov_hi = float(z_sorted[-1]) + geo.slice_mm / 2
    fov: dict[str, tuple[float, float] | None] = {}
    metal_rel: dict[str, tuple[float, float] | None] = {}
    profiles: list[StructureProfile] = []
    for side, code in SIDES:
        # without a landmark: absolute patient z, for the bone-profile registration (module docstring)
        lm = landmark_z[side] if landmark_z[side] is not None else 0.0
        fov[side] = (fov_lo - lm, fov_hi - lm)
        m = metal_abs[side]
        metal_rel[side] = (m[0] - lm, m[1] - lm) if m is not None else None
        stats = _SliceStats(count[order, :, code], hu_sum[order, :, code], fat[order, :, code])
        profiles.extend(_side_profiles(table, side, stats, z_sorted - lm, geo))
    logger.info(
        "anatomical profiles: %d profiles on %s voxels, landmark right=%s left=%s mm, in %.2f s",
        len(profiles), "x".join(map(str, volume.hu.shape)),
        _fmt(landmark_z["right"]), _fmt(landmark_z["left"]), time.perf_counter() - t0,
    )
    return AnatomicalProfiles(
        landmark="; ".join([LANDMARK, *notes]),
        landmark_z_mm=landmark_z,
        fov_z_mm=fov,
        profiles=tuple(profiles),
        metal_z_mm=metal_rel,
        bone=bone,
        landmark_reliable=reliable,
    )


def _check_profile_inputs(volume: Volume, segmentation: Segmentation, fat_hu: tuple[float, float]) -> None:
    """The label map on the volume's grid, with ids of its label table; a fat HU window (min < max)."""
    if segmentation.label_map.shape != volume.hu.shape:
        raise CompareError(
            f"segmentation shape {segmentation.label_map.shape} differs from volume shape {volume.hu.shape}; "
            "the label map must be on the volume's grid"
        )
    if not fat_hu[0] < fat_hu[1]:
        raise CompareError(f"fat_hu is {fat_hu!r}; allowed: (minimum, maximum) with minimum < maximum")
    n_labels = len(segmentation.labels.labels)
    max_id = int(segmentation.label_map.max()) if segmentation.label_map.size else 0
    if max_id > n_labels or int(segmentation.label_map.min()) < 0:
        raise CompareError(f"label_map holds ids up to {max_id}; the label table allows 0..{n_labels}")


def _metal_z_mm(
    is_metal: np.ndarray, midline: float, affine: np.ndarray, geo: _Geometry, min_volume_ml: float
) -> dict[str, tuple[float, float] | None]:
    """Absolute z extent (mm, slice edges) of the metal on each side, or None.

    The array has the slice axis first (``affine`` is its); metal voxels get their side
    from the midline x (mm).
    """
    metal_abs: dict[str, tuple[float, float] | None] = {"right": None, "left": None}
    mk, mr, mc = np.nonzero(is_metal)
    if mk.size:
        x = _voxel_x(affine, 0, mk, mr, mc)
        for side, left in (("right", False), ("left", True)):
            on_side = (x > midline) if left else (x <= midline)
            per_slice = np.bincount(mk[on_side], minlength=is_metal.shape[0])
            if per_slice.sum() * geo.voxel_mm3 / 1000.0 < min_volume_ml:
                continue
            slices = np.flatnonzero(per_slice * geo.pixel_area_mm2 >= METAL_MIN_SLICE_AREA_MM2)
            if slices.size:
                z = geo.slice_z_mm[slices]
                metal_abs[side] = (float(z.min()) - geo.slice_mm / 2, float(z.max()) + geo.slice_mm / 2)
    return metal_abs


def _choose_landmarks(
    found: Mapping[str, _Landmark], metal_abs: Mapping[str, tuple[float, float] | None]
) -> tuple[dict[str, float | None], dict[str, bool], list[str]]:
    """Each side's landmark z after the reliability check and the fallback, whether it is reliable
    (False: used although metal lies near it and the other side's is no better), and notes on what was done."""
    found = dict(found)
    notes: list[str] = []
    reliable: dict[str, bool] = {}
    for side, _ in SIDES:
        lm, metal = found[side].z_mm, metal_abs[side]
        near_metal = (
            lm is not None and metal is not None
            and metal[0] - LANDMARK_METAL_MM <= lm <= metal[1] + LANDMARK_METAL_MM
        )
        reliable[side] = lm is not None and not near_metal
        if near_metal:
            found[side] = _Landmark(lm, f"metal within {LANDMARK_METAL_MM:g} mm of the femoral head: prosthesis")
    landmark_z: dict[str, float | None] = {}
    chosen_reliable: dict[str, bool] = {}
    for side, _ in SIDES:
        other = "left" if side == "right" else "right"
        chosen_reliable[side] = reliable[side] or reliable[other]
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
    return landmark_z, chosen_reliable, notes


def _bone_profiles(
    hu: np.ndarray, affine: np.ndarray, midline: float, geo: _Geometry, metal_hu: float
) -> dict[str, BoneProfile | None]:
    """Per side, bone-window area and metal per slice in ascending z (module docstring), in slabs.

    ``hu`` has the slice axis first and ``affine`` is its; a voxel is on the left when its
    LPS x is above ``midline`` (mm), as in :func:`_metal_z_mm`.
    """
    nk, nr, nc = hu.shape
    x_plane = affine[0, 3] + affine[0, 1] * np.arange(nr)[:, None] + affine[0, 2] * np.arange(nc)[None, :]
    counts = {name: np.zeros((nk, 2), dtype=np.int64) for name in ("bone", "metal")}  # [slice, (all, left)]
    slab = max(1, _SLAB_VOXELS // max(1, nr * nc))
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        ks = np.arange(k0, k1, dtype=np.float64)[:, None, None]
        left = (x_plane[None] + affine[0, 0] * ks) > midline if affine[0, 0] else (x_plane > midline)[None]
        h = hu[k0:k1]
        is_metal = h > metal_hu
        for name, mask in (("bone", (h >= BONE_HU) & ~is_metal), ("metal", is_metal)):
            counts[name][k0:k1, 0] = np.count_nonzero(mask, axis=(1, 2))
            counts[name][k0:k1, 1] = np.count_nonzero(mask & left, axis=(1, 2))
    order = np.argsort(geo.slice_z_mm)
    z = tuple(float(v) for v in geo.slice_z_mm[order])
    out: dict[str, BoneProfile | None] = {}
    for side, column in (("right", None), ("left", 1)):
        def per_side(c: np.ndarray) -> np.ndarray:
            return (c[:, 1] if column else c[:, 0] - c[:, 1])[order]

        area = per_side(counts["bone"]) * geo.pixel_area_mm2
        metal = per_side(counts["metal"]) * geo.pixel_area_mm2 >= METAL_MIN_SLICE_AREA_MM2
        out[side] = BoneProfile(
            z_mm=z, area_mm2=tuple(float(v) for v in area), metal=tuple(bool(v) for v in metal),
            slice_mm=geo.slice_mm,
        )
    return out


@dataclass(frozen=True)
class _SliceStats:
    """One side's per-slice statistics in ascending z, indexed [slice, label id]."""

    count: np.ndarray
    hu_sum: np.ndarray
    fat: np.ndarray


def _side_profiles(
    table: LabelTable, side: str, stats: _SliceStats, z_rel_mm: np.ndarray, geo: _Geometry
) -> list[StructureProfile]:
    """The profile of every structure present on one side, over its slice extent (z relative to the landmark)."""
    profiles: list[StructureProfile] = []
    for label in table.labels:
        n = stats.count[:, label.id]
        nz = np.flatnonzero(n)
        if nz.size == 0:
            continue
        sl = slice(int(nz[0]), int(nz[-1]) + 1)
        nn = n[sl]
        sums = stats.hu_sum[:, label.id][sl]
        mean = np.divide(sums, nn, out=np.zeros(nn.shape), where=nn > 0)
        profiles.append(
            StructureProfile(
                key=label.key,
                side=side,
                z_mm=tuple(float(z) for z in z_rel_mm[sl]),
                area_mm2=tuple(float(v) for v in nn * geo.pixel_area_mm2),
                mean_hu=tuple(float(v) for v in mean),
                voxels=tuple(int(v) for v in nn),
                fat_voxels=tuple(int(v) for v in stats.fat[:, label.id][sl]),
                slice_mm=geo.slice_mm,
            )
        )
    return profiles


def _moved_affine(affine: np.ndarray, axis: int) -> np.ndarray:
    """The affine of the arrays after ``np.moveaxis(a, axis, 0)``."""
    cols = [axis] + [i for i in range(3) if i != axis]
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:, :3] = affine[:, cols]
    return out


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.1f}"
