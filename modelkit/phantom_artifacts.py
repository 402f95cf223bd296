"""Metal artefacts of a phantom CT, slice by slice (scipy/numpy only).

Three effects, all scaled with the metal cross-section of the slice, so a thin screw disturbs
the image less than a stem:

- radial bright/dark streaks through each side's metal (photon starvation and scatter): the same
  random angles and amplitudes on every slice of one scan;
- beam-hardening dark bands between separate metal pieces of one slice (the two stems of a
  bilateral arthroplasty, a plate and its screws, a nail and its lag screw): a band along the
  line joining the pieces' centroids, Gaussian across the line, its depth growing with both
  pieces' areas (up to ~450 HU);
- a halo just around the metal: a bright rim (blooming) then a dark trough a few mm out.

Metal voxels end at >= 3000 HU.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METAL_MIN_HU = 3000.0
BAND_MAX_HU = 450.0  # deepest beam-hardening band between two large pieces
BAND_AREA_MM2 = 150.0  # geometric-mean area at which a band reaches ~63 % of its maximum
BAND_MIN_GAP_MM = 8.0  # pieces with closer centroids (head inside a cup) make no band
BAND_PIECES = 6  # bands between the largest pieces of a slice only
HALO_MARGIN_MM = 12.0


def _streaks(
    X: np.ndarray, Y: np.ndarray, cx: float, cy: float, angles: np.ndarray, amps: np.ndarray
) -> np.ndarray:
    phi = np.arctan2(Y - cy, X - cx)
    rho = np.hypot(X - cx, Y - cy)
    decay = np.exp(-rho / 140.0)
    streak = np.zeros_like(rho)
    for ang, amp in zip(angles, amps):
        perp = np.abs(rho * np.sin(phi - ang))
        streak += amp * np.exp(-(perp**2) / (2 * 2.5**2))
    return streak * decay


def _pieces(metal2d: np.ndarray, x: np.ndarray, y: np.ndarray, pixel_mm2: float) -> list[tuple[float, float, float]]:
    """(centroid x, centroid y, area mm²) of each connected metal piece, largest first."""
    lab, n = ndimage.label(metal2d, structure=np.ones((3, 3), dtype=bool))
    if n < 2:
        return []
    idx = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones_like(lab), lab, idx)
    rows, cols = np.nonzero(lab)
    ids = lab[rows, cols]
    cx = np.bincount(ids, weights=x[cols], minlength=n + 1)[1:] / counts
    cy = np.bincount(ids, weights=y[rows], minlength=n + 1)[1:] / counts
    order = np.argsort(-counts, kind="stable")[:BAND_PIECES]
    return [(float(cx[i]), float(cy[i]), float(counts[i] * pixel_mm2)) for i in order]


def _dark_bands(X: np.ndarray, Y: np.ndarray, pieces: list[tuple[float, float, float]]) -> np.ndarray:
    """Beam-hardening bands (negative HU) between every pair of pieces of one slice."""
    band = np.zeros(X.shape, dtype=np.float64)
    for i, (x1, y1, a1) in enumerate(pieces):
        for x2, y2, a2 in pieces[i + 1:]:
            length = math.hypot(x2 - x1, y2 - y1)
            if length < BAND_MIN_GAP_MM:
                continue
            ex, ey = (x2 - x1) / length, (y2 - y1) / length
            along = (X - x1) * ex + (Y - y1) * ey
            perp = np.abs(-(X - x1) * ey + (Y - y1) * ex)
            outside = np.maximum(np.maximum(-along, along - length), 0.0)
            sigma = max(3.0, 0.35 * 2.0 * math.sqrt(min(a1, a2) / math.pi))
            depth = BAND_MAX_HU * (1.0 - math.exp(-math.sqrt(a1 * a2) / BAND_AREA_MM2))
            band -= depth * np.exp(-(perp**2) / (2 * sigma**2)) * np.exp(-(outside**2) / (2 * 30.0**2))
    return band


def _halo(hu2d: np.ndarray, metal2d: np.ndarray, spacing_rc: tuple[float, float], strength: float) -> None:
    """Bright rim right outside the metal, dark trough ~4 mm out; in place on one slice."""
    dy, dx = spacing_rc
    rows, cols = np.nonzero(metal2d)
    mr, mc = int(math.ceil(HALO_MARGIN_MM / dy)), int(math.ceil(HALO_MARGIN_MM / dx))
    sl = (slice(max(rows.min() - mr, 0), rows.max() + mr + 1), slice(max(cols.min() - mc, 0), cols.max() + mc + 1))
    d = ndimage.distance_transform_edt(~metal2d[sl], sampling=(dy, dx))
    halo = 350.0 * np.exp(-d / 1.0) - 150.0 * np.exp(-(((d - 4.0) / 2.5) ** 2))
    halo[d == 0] = 0.0
    hu2d[sl] += (strength * halo).astype(np.float32)


def add_metal_artifacts(
    hu: np.ndarray, metal: np.ndarray, left2d: np.ndarray, x: np.ndarray, y: np.ndarray,
    spacing_mm: tuple[float, float, float], rng: np.random.Generator,
) -> None:
    """Streaks, dark bands and halo on every slice with metal (in place); ``left2d`` (r, c) marks the
    patient's left half, each side's metal streaking from its own centroid; ``x``, ``y`` are the
    column and row coordinates in mm."""
    angles = rng.uniform(0, np.pi, size=14)
    amps = rng.uniform(250, 700, size=14) * np.where(np.arange(14) % 2 == 0, 1.0, -1.0)
    X, Y = np.meshgrid(x, y)
    _, dy, dx = spacing_mm
    for k in np.flatnonzero(metal.any(axis=(1, 2))):
        total = np.zeros(X.shape, dtype=np.float64)
        for half in (left2d, ~left2d):
            rr, cc = np.nonzero(metal[k] & half)
            if rr.size == 0:
                continue
            strength = min(1.0, math.sqrt(rr.size * dx * dy / 400.0))
            total += strength * _streaks(X, Y, float(x[cc].mean()), float(y[rr].mean()), angles, amps)
        pieces = _pieces(metal[k], x, y, dx * dy)
        if pieces:
            total += _dark_bands(X, Y, pieces)
        hu[k] += total.astype(np.float32)
        _halo(hu[k], metal[k], (dy, dx), min(1.0, math.sqrt(metal[k].sum() * dx * dy / 400.0)))
    hu[metal] = np.maximum(hu[metal], METAL_MIN_HU)
