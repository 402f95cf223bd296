"""Post-processing of a label map: patient side, and the largest component per structure and side."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from pipeline.types import SIDE_LEFT, SIDE_NONE, SIDE_RIGHT

logger = logging.getLogger(__name__)

#: Label key of the femur, used to find the patient midline.


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask (None when empty), without materialising coordinates."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if len(hits) == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def find_midline_x_mm(label_map: np.ndarray, affine_lps: np.ndarray, femur_id: int | None) -> float:
    """Patient midline x (LPS mm).

    Both femora present: the mid-point of their centroids' x (the femur voxels are split
    into the two largest connected components, the smaller holding at least a fifth of
    the larger). Otherwise the centre of the x extent of all labelled voxels (the body).
    """
    a = np.asarray(affine_lps, dtype=np.float64)
    if femur_id is not None:
        box = _bbox(label_map == femur_id)
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
    box = _bbox(label_map > 0)
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


def keep_largest_components(
    label_map: np.ndarray, side_map: np.ndarray, min_fraction: float = MIN_COMPONENT_FRACTION
) -> np.ndarray:
    """Per structure and side keep the largest 3-D (6-connected) components: the largest one and any
    other holding at least ``min_fraction`` of it; smaller islands -> background.

    Returns a new array; the inputs are not modified. Works inside each structure's
    bounding box so the cost scales with the structures, not the volume.
    """
    if label_map.shape != side_map.shape:
        raise ValueError(f"label_map shape {label_map.shape} differs from side_map shape {side_map.shape}")
    out = np.array(label_map, copy=True)
    objects = ndimage.find_objects(label_map)
    for index, box in enumerate(objects):
        if box is None:
            continue
        label_id = index + 1
        sub_labels = label_map[box]
        sub_sides = side_map[box]
        for side in (SIDE_NONE, SIDE_RIGHT, SIDE_LEFT):
            mask = (sub_labels == label_id) & (sub_sides == side)
            if not mask.any():
                continue
            comps, count = ndimage.label(mask)
            if count <= 1:
                continue
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            drop = mask & (sizes[comps] < min_fraction * sizes.max())
            out_view = out[box]
            out_view[drop] = 0
    return out
