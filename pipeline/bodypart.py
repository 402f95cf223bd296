"""Femoral shafts and the femur label: the bone machinery of the field-of-view check.

The node's field-of-view check is :mod:`pipeline.coverage` (which regions a series covers),
built on :func:`find_bone_components` and :func:`classify_shafts` here; after the model the
workflow checks the femur label (:func:`femur_label_volumes_ml`).

Femoral shafts, image-based and model-free (:func:`find_femoral_shafts`): in every axial
    slice, bone (HU > ``bone_hu``) is split into 2-D connected components with their holes
    filled (the fatty marrow inside the cortical ring), and each component is classed
    by its area, roundness (equivalent diameter / major-axis length from its second
    moments: 1 for a disc, 0.71 for a 2:1 ellipse) and lateral offset from the body
    midline (x-centroid of the body, HU > ``body_hu``, in that slice). A femoral shaft
    cross-section is a compact round component of ``min_area_cm2``..``max_area_cm2``
    lying ``min_offset_mm``..``max_offset_mm`` to one side of the midline. A slice
    counts when it holds one on the patient's left AND one on the right; the result
    gives the z extent of the longest run of such slices (gaps of one slice allowed).
    What is rejected, and why:

    * spine, sacrum, sternum, pubic symphysis: centroid near the midline;
    * ribs, fibula-sized or thin bone: too small, or elongated;
    * iliac wings, the pelvic ring, femoral neck and trochanters: large or elongated;
    * arms held at the sides (humeri): too far lateral.

    Femoral heads (about 45 mm wide, merged with the acetabulum at this threshold) and
    the trochanteric region are mostly rejected as large/elongated: this looks for the
    shaft, so a scan that ends just below the hip joints shows little of it
    (:mod:`pipeline.coverage` finds the heads).

Slices are taken along the array axis most aligned with patient z (from the affine),
so nothing here depends on slice order. In-plane, images finer than
:data:`WORK_PIXEL_MM` are subsampled for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.labels import FEMUR_KEY
from pipeline.types import SIDE_LEFT, SIDE_RIGHT, Segmentation, Volume

WORK_PIXEL_MM = 1.4
"""In-plane pixels finer than this are subsampled by an integer stride."""
_SLAB_VOXELS = 16_000_000
_STRUCT_2D = np.zeros((3, 3, 3), dtype=bool)
_STRUCT_2D[1] = True  # 8-connected within a slice, never across slices
_STRUCT_2D.setflags(write=False)
_THICK_MIN_MM2 = 500.0  # components smaller than this get an upper bound for their inscribed disc


@dataclass(frozen=True)
class FemurShaftCriteria:
    """What counts as a femoral shaft cross-section (defaults: adult femoral shafts)."""

    bone_hu: float = 300.0
    body_hu: float = -300.0
    min_area_cm2: float = 2.0
    max_area_cm2: float = 15.0
    min_roundness: float = 0.75
    min_offset_mm: float = 30.0
    max_offset_mm: float = 170.0
    max_gap_slices: int = 1


@dataclass(frozen=True)
class FemurShaftSearch:
    """What the image-based check found.

    ``run_mm``: z extent (mm) of the longest run of slices holding a left and a right
    shaft candidate; ``seen``: (kind of rejected bone component, number of slices it was
    seen in), kinds being "midline bone (spine, sacrum, sternum, symphysis)", "small or
    thin bone (ribs)", "large or elongated bone (iliac wings, pelvis, femoral neck)",
    "far-lateral bone (arms)" and "round bone on one side only".
    """

    n_slices: int
    z_min_mm: float
    z_max_mm: float
    pair_slices: int
    run_mm: float
    run_z_mm: tuple[float, float] | None
    seen: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        seen = ", ".join(f"{kind} in {n} slices" for kind, n in self.seen if n) or "none"
        run = (
            f"{self.run_mm:.0f} mm (z {self.run_z_mm[0]:.0f}..{self.run_z_mm[1]:.0f} mm)"
            if self.run_z_mm is not None
            else "0 mm"
        )
        return (
            f"{self.pair_slices} of {self.n_slices} axial slices (z {self.z_min_mm:.0f}..{self.z_max_mm:.0f} mm) "
            f"hold a round compact bone cross-section left and right of the midline; the longest run covers {run}; "
            f"other bone components seen: {seen}"
        )


_KIND_MIDLINE = "midline bone (spine, sacrum, sternum, symphysis)"
_KIND_SMALL = "small or thin bone (ribs)"
_KIND_LARGE = "large or elongated bone (iliac wings, pelvis, femoral neck)"
_KIND_FAR = "far-lateral bone (arms)"
_KIND_SINGLE = "round bone on one side only"
_KINDS = (_KIND_MIDLINE, _KIND_SMALL, _KIND_LARGE, _KIND_FAR, _KIND_SINGLE)


def _component_moments(labels: np.ndarray, n: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Per component 1..n: [count, Σk, Σr, Σc, Σr², Σc², Σrc] (index units; ``offset``: the (row, column)
    of ``labels[:, 0, 0]`` in the slice, so the sums are those of the uncropped slab)."""
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    k, r, c = np.unravel_index(fg, labels.shape)
    r, c = r + offset[0], c + offset[1]
    out = np.empty((n + 1, 7))
    out[:, 0] = np.bincount(lab, minlength=n + 1)
    for i, w in enumerate((k, r, c, r * r, c * c, r * c), start=1):
        out[:, i] = np.bincount(lab, weights=w.astype(np.float64), minlength=n + 1)
    return out[1:]


def _bone_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns of the slab holding every slice's ``mask`` pixels, one pixel wider on each side where the
    slice allows (None: no pixel). Outside it every pixel is background joined to the slice border, so holes,
    components and their sums are the same within it as in the whole slice."""
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    return (slice(max(0, rows[0] - 1), min(mask.shape[1], rows[-1] + 2)),
            slice(max(0, cols[0] - 1), min(mask.shape[2], cols[-1] + 2)))


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill in-plane holes of every slice (background not connected to the slice border)."""
    bg, _ = ndimage.label(~mask, structure=_STRUCT_2D)
    border = np.zeros(bg.max() + 1, dtype=bool)
    for face in (bg[:, 0, :], bg[:, -1, :], bg[:, :, 0], bg[:, :, -1]):
        border[face] = True
    border[0] = True
    return mask | ~border[bg]


@dataclass(frozen=True)
class _Components:
    """The in-plane bone components of a slab of slices (one entry per component)."""

    slice_idx: np.ndarray  # slice within the slab
    row: np.ndarray  # centroid, working-grid index units
    col: np.ndarray
    area_mm2: np.ndarray
    roundness: np.ndarray  # equivalent-circle diameter / major axis (1 for a disc)
    inscribed_mm: np.ndarray  # diameter of the largest inscribed disc
    dense_fraction: np.ndarray  # share of pixels above the dense threshold


def _body_midline_x(block: np.ndarray, body_hu: float, origin: np.ndarray, cols: np.ndarray, k0: int) -> np.ndarray:
    """Body midline x (LPS mm) per slice of the slab: the index centroid of the body, mapped to x."""
    body = block > body_hu
    per_row = np.count_nonzero(body, axis=2)  # (slice, row): integer counts, so the sums below are exact
    n_body = per_row.sum(axis=1).astype(np.float64)
    r_mean = (per_row * np.arange(block.shape[1])).sum(axis=1) / np.maximum(n_body, 1)
    c_mean = (np.count_nonzero(body, axis=1) * np.arange(block.shape[2])).sum(axis=1) / np.maximum(n_body, 1)
    ks = np.arange(k0, k0 + block.shape[0])
    return origin[0] + cols[0, 0] * ks + cols[0, 1] * r_mean + cols[0, 2] * c_mean


def _inscribed_mm(labels: np.ndarray, counts: np.ndarray, sampling: tuple[float, float], min_pixels: float) -> np.ndarray:
    """Per component 1..n: the diameter (mm) of the largest disc inside it.

    Measured (distance transform over the component's own box) for components of at least
    ``min_pixels``; smaller ones get their equivalent-circle diameter, an upper bound.
    """
    out = 2.0 * np.sqrt(counts * sampling[0] * sampling[1] / math.pi)
    for i, box in enumerate(ndimage.find_objects(labels)):
        if box is None or counts[i] < min_pixels:
            continue
        mask = np.pad(labels[box][0] == i + 1, 1)
        out[i] = 2.0 * float(ndimage.distance_transform_edt(mask, sampling=sampling).max())
    return out


@dataclass(frozen=True)
class _Thresholds:
    bone_hu: float  # bone (and metal) for the components
    dense_hu: float  # cortical bone or metal within them
    thickness: bool  # measure the largest inscribed disc (a distance transform per slice)


def _bone_components(
    block: np.ndarray, hu: _Thresholds, plane: np.ndarray, pixel_mm2: float, sampling: tuple[float, float, float]
) -> _Components | None:
    """Hole-filled bone components of every slice of the slab with their shape; None when there is no bone.

    ``sampling``: (row mm, column mm) of a pixel.
    """
    bone = block > hu.bone_hu
    box = _bone_box(bone)
    if box is None:
        return None
    block = block[:, box[0], box[1]]  # the bone's box: the same components, far fewer pixels to label
    bone = _fill_holes_2d(bone[:, box[0], box[1]])
    labels, n = ndimage.label(bone, structure=_STRUCT_2D)
    if n == 0:
        return None
    dense = np.bincount(labels[block > hu.dense_hu], minlength=n + 1)[1:].astype(np.float64)
    del bone
    m = _component_moments(labels, n, (box[0].start, box[1].start))
    cnt = m[:, 0]
    if hu.thickness:
        inscribed_mm = _inscribed_mm(labels, cnt, sampling, _THICK_MIN_MM2 / pixel_mm2)
    else:
        inscribed_mm = np.full(n, np.nan)
    del labels
    kc, rc, cc = m[:, 1] / cnt, m[:, 2] / cnt, m[:, 3] / cnt
    var_r = m[:, 4] / cnt - rc * rc
    var_c = m[:, 5] / cnt - cc * cc
    cov_rc = m[:, 6] / cnt - rc * cc
    cov_idx = np.stack([np.stack([var_r, cov_rc], -1), np.stack([cov_rc, var_c], -1)], -2)  # (n, 2, 2)
    # second moments in mm (each pixel also has its own extent: + 1/12 per axis)
    cov_idx = cov_idx + np.eye(2) / 12.0
    cov_mm = plane @ cov_idx @ plane.T  # (n, 3, 3), rank 2
    lam_max = np.linalg.eigvalsh(cov_mm)[:, -1]
    area_mm2 = cnt * pixel_mm2
    major_mm = 4.0 * np.sqrt(np.maximum(lam_max, 1e-9))
    roundness = 2.0 * np.sqrt(area_mm2 / math.pi) / major_mm
    return _Components(np.rint(kc).astype(np.intp), rc, cc, area_mm2, roundness, inscribed_mm, dense / cnt)


@dataclass(frozen=True)
class BoneComponents:
    """The hole-filled in-plane bone components of every axial slice of a volume.

    Slices run along the array axis most aligned with patient z; per slice ``z_mm`` (patient
    z) and ``midline_x_mm`` (x of the body's centroid, HU > ``body_hu``); per component its
    slice, ``offset_mm`` (x minus the slice's midline; LPS: > 0 on the patient's left),
    ``y_mm`` (its centroid's anterior-posterior position), ``area_mm2``, ``roundness``
    (equivalent-circle diameter / major axis) and ``inscribed_mm`` (the diameter of the
    largest disc inside it: thick bone such as a femoral head or condyle, not a thin wing) and
    ``dense_fraction`` (the share of its pixels above ``dense_hu``: cortical bone or metal;
    contrast-filled organs have none). Metal (any HU above ``bone_hu``) counts as bone.
    """

    z_mm: np.ndarray
    slice_mm: float
    slice_idx: np.ndarray
    offset_mm: np.ndarray
    y_mm: np.ndarray
    area_mm2: np.ndarray
    roundness: np.ndarray
    inscribed_mm: np.ndarray
    dense_fraction: np.ndarray

    @property
    def n_slices(self) -> int:
        return int(self.z_mm.size)


def find_bone_components(
    volume: Volume, bone_hu: float = 300.0, body_hu: float = -300.0, dense_hu: float = 300.0, *, thickness: bool = True
) -> BoneComponents:
    """Label the hole-filled bone of every axial slice into 2-D components and measure each.

    ``thickness=False`` skips the inscribed discs (``inscribed_mm`` is NaN): faster. Components
    under 5 cm² get their equivalent-circle diameter as ``inscribed_mm`` (an upper bound).
    """
    affine = volume.affine_lps
    axis = int(np.argmax(np.abs(affine[2, :3])))
    in_plane = [a for a in range(3) if a != axis]
    spacing = volume.spacing_mm
    strides = [max(1, int(WORK_PIXEL_MM // spacing[a])) for a in in_plane]
    hu = np.moveaxis(volume.hu, axis, 0)[:, :: strides[0], :: strides[1]]
    # affine of the working grid: (slice, row', col') -> LPS
    cols = np.stack([affine[:3, axis], affine[:3, in_plane[0]] * strides[0], affine[:3, in_plane[1]] * strides[1]], axis=1)
    origin = affine[:3, 3]
    pixel_mm2 = float(np.linalg.norm(np.cross(cols[:, 1], cols[:, 2])))
    plane = cols[:, 1:]  # 3x2: in-plane index -> mm
    sampling = (float(np.linalg.norm(cols[:, 1])), float(np.linalg.norm(cols[:, 2])))
    nk = hu.shape[0]
    slab = max(1, _SLAB_VOXELS // max(1, hu.shape[1] * hu.shape[2]))
    parts: list[tuple[np.ndarray, ...]] = []
    for k0 in range(0, nk, slab):
        block = np.asarray(hu[k0 : k0 + slab])
        mid_x = _body_midline_x(block, body_hu, origin, cols, k0)
        comps = _bone_components(block, _Thresholds(bone_hu, dense_hu, thickness), plane, pixel_mm2, sampling)
        if comps is None:
            continue
        k = comps.slice_idx + k0
        x = origin[0] + cols[0, 0] * k + cols[0, 1] * comps.row + cols[0, 2] * comps.col
        y = origin[1] + cols[1, 0] * k + cols[1, 1] * comps.row + cols[1, 2] * comps.col
        offset = x - mid_x[comps.slice_idx]
        parts.append((k, offset, y, comps.area_mm2, comps.roundness, comps.inscribed_mm, comps.dense_fraction))
    fields = [np.concatenate(f) for f in zip(*parts)] if parts else [np.zeros(0, np.intp)] + [np.zeros(0)] * 6
    return BoneComponents(origin[2] + cols[2, 0] * np.arange(nk), abs(float(cols[2, 0])), *fields)


def find_femoral_shafts(volume: Volume, criteria: FemurShaftCriteria | None = None) -> FemurShaftSearch:
    """Search every axial slice for a left and a right femoral shaft cross-section."""
    crit = criteria if criteria is not None else FemurShaftCriteria()
    return classify_shafts(find_bone_components(volume, crit.bone_hu, crit.body_hu, thickness=False), crit)


def classify_shafts(bones: BoneComponents, crit: FemurShaftCriteria) -> FemurShaftSearch:
    """Class every bone component (shaft candidate or one of the rejected kinds) and find the pair run."""
    nk, z = bones.n_slices, bones.z_mm
    slice_idx, area_mm2, offset = bones.slice_idx, bones.area_mm2, bones.offset_mm
    small = area_mm2 < crit.min_area_cm2 * 100.0
    large = area_mm2 > crit.max_area_cm2 * 100.0
    elongated = bones.roundness < crit.min_roundness
    midline = np.abs(offset) < crit.min_offset_mm
    far = np.abs(offset) > crit.max_offset_mm
    candidate = ~small & ~large & ~elongated & ~midline & ~far
    kinds = {kind: np.zeros(nk, dtype=bool) for kind in _KINDS}
    seen_k = {
        _KIND_MIDLINE: midline & ~small,
        _KIND_SMALL: small & ~midline,
        _KIND_LARGE: (large | (elongated & ~small)) & ~midline,
        _KIND_FAR: far & ~small & ~large & ~elongated,
    }
    for kind, sel in seen_k.items():
        kinds[kind][slice_idx[sel]] = True
    left = np.zeros(nk, dtype=bool)
    right = np.zeros(nk, dtype=bool)
    # LPS: x grows toward the patient's left
    left[slice_idx[candidate & (offset > 0)]] = True
    right[slice_idx[candidate & (offset < 0)]] = True
    pair = left & right
    kinds[_KIND_SINGLE] = (left | right) & ~pair
    run_mm, run_z = longest_run(pair, z, bones.slice_mm, crit.max_gap_slices)
    return FemurShaftSearch(
        n_slices=nk,
        z_min_mm=float(z.min()),
        z_max_mm=float(z.max()),
        pair_slices=int(pair.sum()),
        run_mm=run_mm,
        run_z_mm=run_z,
        seen=tuple((kind, int(kinds[kind].sum())) for kind in _KINDS),
    )


def longest_run(flags: np.ndarray, z: np.ndarray, dz: float, max_gap: int) -> tuple[float, tuple[float, float] | None]:
    """z extent (mm, slice thickness included) of the longest run of True with gaps <= max_gap."""
    hits = np.flatnonzero(flags)
    if hits.size == 0:
        return 0.0, None
    breaks = np.flatnonzero(np.diff(hits) > max_gap + 1)
    starts = np.concatenate([[hits[0]], hits[breaks + 1]])
    ends = np.concatenate([hits[breaks], [hits[-1]]])
    best = int(np.argmax(ends - starts))
    a, b = int(starts[best]), int(ends[best])
    lo, hi = sorted((float(z[a]), float(z[b])))
    return hi - lo + dz, (lo, hi)


def femur_label_volumes_ml(segmentation: Segmentation, voxel_ml: float) -> tuple[float, float] | None:
    """(right, left) volume in cm³ of the segmentation's ``femur`` label; None if the table has none.

    ``voxel_ml``: the voxel volume of the grid (the volume's; the segmentation is on it).
    """
    if FEMUR_KEY not in segmentation.labels.keys():
        return None
    fid = segmentation.labels.by_key(FEMUR_KEY).id
    mask = segmentation.label_map == fid
    sides = np.bincount(segmentation.side_map[mask].ravel(), minlength=3)
    return float(sides[SIDE_RIGHT] * voxel_ml), float(sides[SIDE_LEFT] * voxel_ml)
