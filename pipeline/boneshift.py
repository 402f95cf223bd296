"""Model-free z alignment of two scans by 1-D registration of their bone profiles.

When a side has no usable femoral-head landmark (pipeline.profiles: the femur label reaches
the top of the field of view, or no femur), the comparison with the prior (pipeline.compare)
still needs the two scans on one z axis. The bone profile of a side - the area of bone-window
voxels per slice, from the image alone (:class:`pipeline.types.BoneProfile`) - is the same
curve along the body in both scans whatever the segmentation did, displaced by the difference
of the two scans' patient z (table position) for the same anatomy.

Registration (:func:`register_bone_profiles`)
    Both profiles are resampled (linear interpolation) to a common step, the smaller of the two
    slice spacings, each on a grid starting at its own first slice; a resampled sample touching
    a metal slice is left out. For every integer-sample shift within ±:data:`MAX_SHIFT_MM` the
    normalised cross-correlation (Pearson) of the overlapping samples both keep is computed;
    shifts with less than :data:`MIN_OVERLAP_MM` of such overlap are not considered. The peak is
    refined below the step by a parabola through it and its two neighbours. Accepted when the
    peak correlation is >= :data:`MIN_CORRELATION` (and its overlap >= MIN_OVERLAP_MM); a flat
    profile (no variation in the overlap) has no correlation and fails.

    ``shift_mm`` = current patient z - prior patient z of the same anatomy: a prior profile at
    z is at z + shift_mm on the current scan's axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.types import BoneProfile

MAX_SHIFT_MM = 150.0
"""Largest z shift searched (mm): two scans of one patient's hips rarely differ by more in table position."""
MIN_OVERLAP_MM = 60.0
"""Least length of bone profile both scans must share (metal slices excluded) for a shift to count."""
MIN_CORRELATION = 0.9
"""Least peak normalised cross-correlation for the registration to be accepted."""
METHOD = "bone profile registration"


@dataclass(frozen=True)
class BoneRegistration:
    """Outcome of one side's registration; ``accepted`` False: ``reason`` says why (values may be None)."""

    accepted: bool
    shift_mm: float | None  # current z - prior z of the same anatomy
    correlation: float | None  # peak normalised cross-correlation
    overlap_mm: float | None  # overlap at the peak (metal samples excluded)
    reason: str

    def describe(self) -> str:
        """E.g. "aligned by bone profile registration (correlation 0.99, shift +12.0 mm)"."""
        return f"aligned by {METHOD} (correlation {self.correlation:.2f}, shift {self.shift_mm:+.1f} mm)"


def _resampled(profile: BoneProfile, step_mm: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(first z, area, usable) on a grid of ``step_mm`` from the profile's first slice."""
    z = np.asarray(profile.z_mm, dtype=np.float64)
    area = np.asarray(profile.area_mm2, dtype=np.float64)
    metal = np.asarray(profile.metal, dtype=np.float64)
    n = int(math.floor((z[-1] - z[0]) / step_mm + 1e-6)) + 1
    grid = z[0] + step_mm * np.arange(n)
    return float(z[0]), np.interp(grid, z, area), np.interp(grid, z, metal) == 0.0


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den <= 1e-9 * max(1.0, float(np.abs(a).max(initial=0.0)) * float(np.abs(b).max(initial=0.0))):
        return math.nan
    return float(a @ b) / den


def _check(profile: BoneProfile, name: str) -> None:
    n = len(profile.z_mm)
    if not (n == len(profile.area_mm2) == len(profile.metal)) or not profile.slice_mm > 0:
        raise ValueError(
            f"{name} bone profile is inconsistent: {n} z, {len(profile.area_mm2)} areas, {len(profile.metal)} "
            f"metal flags, slice_mm {profile.slice_mm!r}; allowed: equal lengths and slice_mm > 0"
        )


def register_bone_profiles(
    prior: BoneProfile,
    current: BoneProfile,
    *,
    max_shift_mm: float = MAX_SHIFT_MM,
    min_overlap_mm: float = MIN_OVERLAP_MM,
    min_correlation: float = MIN_CORRELATION,
) -> BoneRegistration:
    """The z shift of ``current`` against ``prior`` maximising the bone profiles' correlation (module docstring)."""
    _check(prior, "prior")
    _check(current, "current")
    if len(prior.z_mm) < 2 or len(current.z_mm) < 2:
        return BoneRegistration(False, None, None, None, f"{METHOD} failed: a scan has fewer than 2 slices")
    step = min(prior.slice_mm, current.slice_mm)
    zp0, ap, up = _resampled(prior, step)
    zc0, ac, uc = _resampled(current, step)
    d0 = zc0 - zp0
    lags = np.arange(math.ceil((d0 - max_shift_mm) / step), math.floor((d0 + max_shift_mm) / step) + 1)
    corr = np.full(lags.size, math.nan)
    overlap = np.zeros(lags.size)
    for n, lag in enumerate(lags):  # prior sample i <-> current sample i - lag
        i0, i1 = max(0, int(lag)), min(ap.size, ac.size + int(lag))
        if i1 <= i0:
            continue
        keep = up[i0:i1] & uc[i0 - lag:i1 - lag]
        overlap[n] = np.count_nonzero(keep) * step
        if overlap[n] >= min_overlap_mm - 1e-6:
            corr[n] = _ncc(ap[i0:i1][keep], ac[i0 - lag:i1 - lag][keep])
    if not np.isfinite(corr).any():
        best_overlap = float(overlap.max(initial=0.0))
        why = (
            f"the scans share at most {best_overlap:.0f} mm of bone profile within ±{max_shift_mm:g} mm "
            f"(needs >= {min_overlap_mm:g} mm)" if best_overlap < min_overlap_mm - 1e-6
            else "the bone profile is flat (no bone variation along z to register)"
        )
        return BoneRegistration(False, None, None, best_overlap, f"{METHOD} failed: {why}")
    k = int(np.nanargmax(corr))
    peak = float(corr[k])
    frac = 0.0
    if 0 < k < corr.size - 1 and np.isfinite(corr[k - 1]) and np.isfinite(corr[k + 1]):
        den = corr[k - 1] - 2.0 * peak + corr[k + 1]
        if den < 0:
            frac = float(np.clip(0.5 * (corr[k - 1] - corr[k + 1]) / den, -0.5, 0.5))
    # prior sample i (z = zp0 + i*step) matches current sample i - lag (z = zc0 + (i - lag)*step)
    shift = d0 - (float(lags[k]) + frac) * step
    if peak < min_correlation:
        return BoneRegistration(
            False, shift, peak, float(overlap[k]),
            f"{METHOD} failed: peak correlation {peak:.2f} (needs >= {min_correlation:g}) "
            f"over {overlap[k]:.0f} mm overlap at shift {shift:+.1f} mm",
        )
    return BoneRegistration(True, shift, peak, float(overlap[k]), "")
