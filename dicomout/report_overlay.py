"""The report's pictures: CT with the segmentation in the label colours, in display orientation.

The volume is reordered from its affine (PS3.3 C.7.6.2.1.1), never from array order, and
drawn in the radiological convention (see :mod:`dicomout.report`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dicomout.errors import ReportError
from pipeline.labels import LabelTable
from pipeline.types import Segmentation, Volume


WINDOW_HU: tuple[float, float] = (-160.0, 240.0)
"""Soft-tissue display window (lower, upper) in HU."""
OVERLAY_ALPHA = 0.4
MAX_DISPLAY_PIXELS = 320
"""Pictures are decimated (integer stride) so that neither side exceeds this."""
_THIGH_MUSCLE_GROUPS = ("anterior", "medial", "posterior")


@dataclass(frozen=True)
class OverlayImage:
    """A picture in display orientation, exactly as the report draws it.

    ``rgb`` is uint8 ``(rows, cols, 3)``: row 0 at the top of the picture, column 0 at
    its left, which is the patient's RIGHT (radiological convention); axial pictures
    have anterior at the top, coronal ones superior at the top. ``width_mm`` /
    ``height_mm`` give the physical extent (for the aspect ratio); ``plane`` is
    "axial" or "coronal", ``position_mm`` the plane's LPS coordinate (z for axial, y
    for coronal) and ``level`` its index along that axis in the reordered volume
    (0 = most inferior / most anterior).
    """

    rgb: np.ndarray
    width_mm: float
    height_mm: float
    plane: str
    position_mm: float
    level: int


@dataclass(frozen=True)
class _Canonical:
    """Views of the volume's arrays reordered to (z up, y back, x left) ascending."""

    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]  # along (z, y, x)
    axis_of: tuple[int, int, int]  # source array axis for z, y, x
    flipped: tuple[bool, bool, bool]
    affine_lps: np.ndarray
    shape_kji: tuple[int, int, int]

    def coordinate_mm(self, lps_axis: int, index: int) -> float:
        """LPS coordinate (0=x, 1=y, 2=z) of the plane ``index`` along a canonical axis."""
        canon_axis = 2 - lps_axis
        src_axis = self.axis_of[canon_axis]
        n = self.shape_kji[src_axis]
        src_index = n - 1 - index if self.flipped[canon_axis] else index
        centre = [(s - 1) / 2.0 for s in self.shape_kji]
        centre[src_axis] = src_index
        point = self.affine_lps @ np.array([*centre, 1.0])
        return float(point[lps_axis])


def _canonical(volume: Volume, segmentation: Segmentation) -> _Canonical:
    """Reorder the arrays (views, no copy) so that axes are (z, y, x) and indices grow
    toward superior, posterior and the patient's left (LPS, PS3.3 C.7.6.2.1.1)."""
    if segmentation.label_map.shape != volume.hu.shape:
        raise ReportError(
            f"segmentation label_map shape {segmentation.label_map.shape} differs from the volume's "
            f"{volume.hu.shape}; the overlay needs the same grid"
        )
    directions = np.asarray(volume.affine_lps, dtype=np.float64)[:3, :3]
    lps_of_axis = [int(np.argmax(np.abs(directions[:, i]))) for i in range(3)]
    if sorted(lps_of_axis) != [0, 1, 2]:
        raise ReportError(
            "cannot orient the pictures: the array axes' directions "
            f"{[tuple(np.round(directions[:, i], 3)) for i in range(3)]} map to LPS axes {lps_of_axis}; "
            "allowed: each array axis closest to a different patient axis"
        )
    axis_of = tuple(lps_of_axis.index(lps) for lps in (2, 1, 0))
    flipped = tuple(bool(directions[lps, axis_of[2 - lps]] < 0) for lps in (2, 1, 0))
    hu = np.transpose(volume.hu, axis_of)
    labels = np.transpose(segmentation.label_map, axis_of)
    flip_slices = tuple(slice(None, None, -1) if f else slice(None) for f in flipped)
    spacing = volume.spacing_mm
    return _Canonical(
        hu=hu[flip_slices],
        labels=labels[flip_slices],
        spacing_mm=tuple(float(spacing[a]) for a in axis_of),  # type: ignore[arg-type]
        axis_of=axis_of,  # type: ignore[arg-type]
        flipped=flipped,  # type: ignore[arg-type]
        affine_lps=np.asarray(volume.affine_lps, dtype=np.float64),
        shape_kji=tuple(volume.hu.shape),  # type: ignore[arg-type]
    )


def _label_lut(labels: LabelTable, max_value: int) -> np.ndarray:
    """RGB (float, 0..255) per label value; values beyond the table are white."""
    lut = np.full((max(max_value, len(labels.labels)) + 1, 3), 255.0)
    lut[0] = 0.0
    for label in labels.labels:
        lut[label.id] = label.color
    return lut


def _muscle_counts(canon: _Canonical, labels: LabelTable) -> tuple[np.ndarray, np.ndarray, int]:
    """Thigh muscle voxel counts per z level and per y level (on an in-plane
    subsampled grid, for speed) and the subsampling stride."""
    stride = max(1, math.ceil(max(canon.labels.shape[1:]) / 128))
    sub = np.asarray(canon.labels[:, ::stride, ::stride])
    ids = [label.id for label in labels.labels if label.group in _THIGH_MUSCLE_GROUPS]
    if sub.size == 0:
        return np.zeros(canon.labels.shape[0]), np.zeros(sub.shape[1]), stride
    top = int(sub.max()) if sub.size else 0
    lut = np.zeros(max(top, len(labels.labels)) + 1, dtype=bool)
    lut[ids] = True
    mask = lut[np.clip(sub, 0, None)]
    if not mask.any():  # no thigh muscle: fall back to any label
        mask = sub > 0
    return mask.sum(axis=(1, 2)), mask.sum(axis=(0, 2)), stride


def _composite(hu: np.ndarray, lab: np.ndarray, labels: LabelTable) -> np.ndarray:
    """Soft-tissue windowed grey CT with the labels blended in at OVERLAY_ALPHA."""
    lo, hi = WINDOW_HU
    grey = np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lab = np.clip(lab.astype(np.int64), 0, None)
    lut = _label_lut(labels, int(lab.max()) if lab.size else 0)
    on = lab > 0
    rgb[on] = (1.0 - OVERLAY_ALPHA) * rgb[on] + OVERLAY_ALPHA * lut[lab[on]]
    return np.round(rgb).astype(np.uint8)


def _stride_for(shape: Sequence[int], max_pixels: int) -> int:
    return max(1, math.ceil(max(shape) / max(1, max_pixels)))


def axial_overlay_rgb(
    volume: Volume,
    segmentation: Segmentation,
    *,
    level: int | None = None,
    max_pixels: int = MAX_DISPLAY_PIXELS,
) -> OverlayImage:
    """The axial picture of the report: rows anterior→posterior, columns patient
    right→left (radiological convention), derived from the affine.

    ``level`` is the index along the superior axis of the reordered volume (0 = most
    inferior); ``None`` picks the level with the largest thigh muscle area (any label
    when there is no thigh muscle, the middle level when nothing is labelled).
    """
    canon = _canonical(volume, segmentation)
    nz = canon.hu.shape[0]
    if level is None:
        per_z, _, _ = _muscle_counts(canon, segmentation.labels)
        level = int(np.argmax(per_z)) if per_z.any() else nz // 2
    if not 0 <= level < nz:
        raise ReportError(f"axial level {level} is outside the volume (0..{nz - 1} along superior)")
    stride = _stride_for(canon.hu.shape[1:], max_pixels)
    hu = np.asarray(canon.hu[level, ::stride, ::stride])  # (y ascending = anterior at top, x ascending)
    lab = np.asarray(canon.labels[level, ::stride, ::stride])
    _, sy, sx = canon.spacing_mm
    return OverlayImage(
        rgb=_composite(hu, lab, segmentation.labels),
        width_mm=canon.hu.shape[2] * sx,
        height_mm=canon.hu.shape[1] * sy,
        plane="axial",
        position_mm=canon.coordinate_mm(2, level),
        level=level,
    )


def coronal_overlay_rgb(
    volume: Volume,
    segmentation: Segmentation,
    *,
    level: int | None = None,
    max_pixels: int = MAX_DISPLAY_PIXELS,
) -> OverlayImage:
    """The coronal reformat of the report: rows superior→inferior, columns patient
    right→left, physical extent for the aspect ratio (slice spacing may differ from
    pixel spacing).

    ``level`` is the index along the posterior axis of the reordered volume (0 = most
    anterior); ``None`` picks the coronal plane with the largest thigh muscle area.
    """
    canon = _canonical(volume, segmentation)
    ny = canon.hu.shape[1]
    if level is None:
        _, per_y, sub_stride = _muscle_counts(canon, segmentation.labels)
        level = min(ny - 1, int(np.argmax(per_y)) * sub_stride) if per_y.any() else ny // 2
    if not 0 <= level < ny:
        raise ReportError(f"coronal level {level} is outside the volume (0..{ny - 1} along posterior)")
    stride = _stride_for((canon.hu.shape[0], canon.hu.shape[2]), max_pixels)
    hu = np.asarray(canon.hu[::-1, level, :][::stride, ::stride])  # superior at top
    lab = np.asarray(canon.labels[::-1, level, :][::stride, ::stride])
    sz, _, sx = canon.spacing_mm
    return OverlayImage(
        rgb=_composite(hu, lab, segmentation.labels),
        width_mm=canon.hu.shape[2] * sx,
        height_mm=canon.hu.shape[0] * sz,
        plane="coronal",
        position_mm=canon.coordinate_mm(1, level),
        level=level,
    )


ENTROPY_MAX_ALPHA = 0.85
"""Opacity of the uncertainty overlay where the normalised entropy is 1 (it fades to 0 at 0)."""


def _entropy_composite(hu: np.ndarray, ent_u8: np.ndarray) -> np.ndarray:
    """Grey CT with the normalised voxel entropy as a red (low) to yellow (high) overlay whose
    opacity grows with the entropy (x2, capped at :data:`ENTROPY_MAX_ALPHA`)."""
    lo, hi = WINDOW_HU
    grey = np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    e = ent_u8.astype(np.float32) / 255.0
    colour = np.stack([np.full_like(e, 255.0), 255.0 * np.clip(2.0 * e, 0.0, 1.0), np.zeros_like(e)], axis=-1)
    alpha = np.clip(2.0 * e, 0.0, ENTROPY_MAX_ALPHA)[..., None]
    return np.round((1.0 - alpha) * rgb + alpha * colour).astype(np.uint8)


def axial_entropy_rgb(
    volume: Volume,
    segmentation: Segmentation,
    *,
    level: int | None = None,
    max_pixels: int = MAX_DISPLAY_PIXELS,
) -> OverlayImage | None:
    """The report's uncertainty picture: the axial slice (display orientation as
    :func:`axial_overlay_rgb`) with the most voxel entropy inside the segmented structures, the
    entropy of the test-time augmentation samples' mean probabilities drawn over the CT.
    None when the segmentation carries no uncertainty (pipeline.uncertainty)."""
    u = segmentation.uncertainty
    if u is None:
        return None
    if u.entropy_map_u8.shape != segmentation.label_map.shape:
        raise ReportError(f"entropy map shape {u.entropy_map_u8.shape} differs from the label map's "
                          f"{segmentation.label_map.shape}")
    ent_view = dataclasses.replace(segmentation, label_map=u.entropy_map_u8, uncertainty=None)
    canon = _canonical(volume, ent_view)
    labels = _canonical(volume, segmentation).labels
    nz = canon.hu.shape[0]
    if level is None:
        stride = max(1, math.ceil(max(canon.labels.shape[1:]) / 128))
        sub_e = np.asarray(canon.labels[:, ::stride, ::stride], dtype=np.float64)
        sub_l = np.asarray(labels[:, ::stride, ::stride]) > 0
        per_z = (sub_e * sub_l).sum(axis=(1, 2))
        level = int(np.argmax(per_z)) if per_z.any() else nz // 2
    if not 0 <= level < nz:
        raise ReportError(f"axial level {level} is outside the volume (0..{nz - 1} along superior)")
    stride = _stride_for(canon.hu.shape[1:], max_pixels)
    hu = np.asarray(canon.hu[level, ::stride, ::stride])
    ent = np.asarray(canon.labels[level, ::stride, ::stride])
    _, sy, sx = canon.spacing_mm
    return OverlayImage(
        rgb=_entropy_composite(hu, ent),
        width_mm=canon.hu.shape[2] * sx,
        height_mm=canon.hu.shape[1] * sy,
        plane="axial",
        position_mm=canon.coordinate_mm(2, level),
        level=level,
    )
