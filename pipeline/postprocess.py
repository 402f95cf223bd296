"""Post-processing of a label map: patient side, and the largest component per structure and side."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from pipeline.types import SIDE_LEFT, SIDE_NONE, SIDE_RIGHT

logger = logging.getLogger(__name__)

#: Label key of the femur, used to find the patient midline.


def _union(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...] | None:
    """The smallest box holding all ``boxes`` (None when there are none)."""
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def find_midline_x_mm(label_map: np.ndarray, affine_lps: np.ndarray, femur_id: int | None) -> float:
    """Patient midline x (LPS mm).

    Both femora present: the mid-point of their centroids' x (the femur voxels are split
    into the two largest connected components, the smaller holding at least a fifth of
    the larger). Otherwise the centre of the x extent of all labelled voxels (the body).
    """
    a = np.asarray(affine_lps, dtype=np.float64)
    boxes = ndimage.find_objects(label_map)  # one pass, no full-size mask (issue 24)
    if femur_id is not None:
        box = boxes[femur_id - 1] if 0 < femur_id <= len(boxes) else None
        if box is not None:
            femur = label_map[box] == femur_id
            offset = np.array([b.start for b in box], dtype=np.float64)
            comps, count = ndimage.label(femur)
            if count >= 2:
                sizes = np.bincount(comps.ravel())
                sizes[0] = 0
                biggest = [int(i) for i in np.argsort(sizes)[::-1][:2]]
                if sizes[biggest[1]] >= 0.2 * sizes[biggest[0]]:
                    centres = ndimage.center_of_mass(femur, comps, biggest)
                    xs = [float(a[0, :3] @ (np.asarray(c) + offset) + a[0, 3]) for c in centres]
                    return 0.5 * (xs[0] + xs[1])
    box = _union([b for b in boxes if b is not None])
    if box is None:
        centre = (np.asarray(label_map.shape, dtype=np.float64) - 1) / 2
        return float(a[0, :3] @ centre + a[0, 3])
    xs = []
    for ck in (box[0].start, box[0].stop - 1):
        for cr in (box[1].start, box[1].stop - 1):
            for cc in (box[2].start, box[2].stop - 1):
                xs.append(float(a[0, :3] @ np.array([ck, cr, cc], dtype=np.float64) + a[0, 3]))
    return 0.5 * (min(xs) + max(xs))


def split_sides(
    label_map: np.ndarray,
    affine_lps: np.ndarray,
    midline_x_mm: float | None = None,
    femur_id: int | None = None,
) -> np.ndarray:
    """Side map (uint8): SIDE_LEFT where x_LPS > midline, SIDE_RIGHT where below, SIDE_NONE on background.

    ``midline_x_mm`` defaults to :func:`find_midline_x_mm` (femora, else the body centre).
    Computed slice by slice (x of one slice in float64 at a time).
    """
    if midline_x_mm is None:
        midline_x_mm = find_midline_x_mm(label_map, affine_lps, femur_id)
    a = np.asarray(affine_lps, dtype=np.float64)
    rows = np.arange(label_map.shape[1], dtype=np.float64)[:, None]
    cols = np.arange(label_map.shape[2], dtype=np.float64)[None, :]
    in_plane = a[0, 1] * rows + a[0, 2] * cols + a[0, 3]
    out = np.zeros(label_map.shape, dtype=np.uint8)
    for k in range(label_map.shape[0]):
        x = in_plane + a[0, 0] * k
        side = np.where(x > midline_x_mm, np.uint8(SIDE_LEFT), np.uint8(SIDE_RIGHT))
        out[k] = np.where(label_map[k] > 0, side, np.uint8(SIDE_NONE))
    return out


#: A component is kept when it holds at least this fraction of its structure's largest component
#: on the same side: islands go, a structure seen in two comparable parts keeps both.
MIN_COMPONENT_FRACTION = 0.2


def _component_sizes(comps: np.ndarray, count: int, slab: int) -> np.ndarray:
    """Voxels per component label (0..count), ``slab`` slices at a time: ``np.bincount`` of the whole
    box would first copy the int32 labels to int64."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    for k in range(0, comps.shape[0], slab):
        sizes += np.bincount(comps[k:k + slab].ravel(), minlength=count + 1)
    return sizes


def keep_largest_components(
    label_map: np.ndarray, side_map: np.ndarray, min_fraction: float = MIN_COMPONENT_FRACTION,
    *, out: np.ndarray | None = None, slab: int = 16,
) -> np.ndarray:
    """Per structure and side keep the largest 3-D (6-connected) components: the largest one and any
    other holding at least ``min_fraction`` of it; smaller islands -> background.

    Returns a new array, or ``out`` (which may be ``label_map`` itself: the islands are set to 0 in
    place) when given; ``side_map`` is not modified. Works inside each structure's bounding box so
    the cost scales with the structures, not the volume, and counts and drops ``slab`` slices of a
    box at a time (no int64 copy of a box's component labels).
    """
    if label_map.shape != side_map.shape:
        raise ValueError(f"label_map shape {label_map.shape} differs from side_map shape {side_map.shape}")
    if out is None:
        out = np.array(label_map, copy=True)
    elif out.shape != label_map.shape or out.dtype != label_map.dtype:
        raise ValueError(f"out is {out.dtype} {out.shape}; allowed: {label_map.dtype} {label_map.shape}")
    elif out is not label_map:
        np.copyto(out, label_map)
    slab = max(1, int(slab))
    objects = ndimage.find_objects(label_map)
    for index, box in enumerate(objects):
        if box is None:
            continue
        label_id = index + 1
        for side in (SIDE_NONE, SIDE_RIGHT, SIDE_LEFT):
            # islands of one label on one side are never another label's or side's voxels: dropping
            # them in place leaves every other mask of this loop as it was
            mask = (label_map[box] == label_id) & (side_map[box] == side)
            if not mask.any():
                continue
            comps, count = ndimage.label(mask)
            del mask
            if count <= 1:
                continue
            sizes = _component_sizes(comps, count, slab)
            sizes[0] = 0
            small = sizes < min_fraction * sizes.max()
            small[0] = False  # background of the box: not this structure
            out_view = out[box]
            for k in range(0, comps.shape[0], slab):
                out_view[k:k + slab][small[comps[k:k + slab]]] = 0
    return out
