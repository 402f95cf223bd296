"""The geometry of one phantom subject: scalars drawn from its seed, femoral landmarks, muscle tracks
along z, and the bones drawn into a slice's tissue and label maps (used by :mod:`modelkit.phantom`).

Positions are in mm: ``u`` lateral distance from the midline (left side positive), ``y`` posterior,
``z`` superior with 0 at the iliac crest; tables in :mod:`modelkit.phantom_anatomy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.interpolate import PchipInterpolator

from modelkit import phantom_anatomy as anat

if TYPE_CHECKING:
    from modelkit.phantom_types import PhantomParams

# Tissue classes of the internal tissue map (rendered to HU at the end).
AIR, FAT, SKIN, MUSCLE, SEPTUM, CORTEX, CANCELLOUS, MARROW, VISCERA, METAL, TABLE = range(11)


# --------------------------------------------------------------------------- subject


@dataclass(frozen=True)
class Subject:
    """Scalars drawn once per phantom from params and seed."""

    zs: float  # z scale (height)
    s: float  # in-plane scale of positions and outlines
    bone_s: float
    muscle_s: float
    fat_mm: float
    midline_x_mm: float
    center_y_mm: float
    rot_rad: float
    knee_shift_mm: float
    muscle_scale: Mapping[str, tuple[float, float]]  # key -> (left, right)
    muscle_shift: Mapping[str, tuple[float, float]]  # key -> (du, dy)
    muscle_hu: Mapping[str, float]


def draw_subject(params: PhantomParams, rng: np.random.Generator) -> Subject:
    male = params.sex == "M"
    zs = params.height_m / anat.REFERENCE_HEIGHT_M
    s = params.size * (1.03 if male else 1.0) * (0.5 + 0.5 * zs)
    scale: dict[str, tuple[float, float]] = {}
    shift: dict[str, tuple[float, float]] = {}
    mhu: dict[str, float] = {}
    for key, _ in anat.MUSCLES:
        common = float(np.clip(rng.normal(1.0, 0.07), 0.86, 1.14))
        sides = np.clip(rng.normal(1.0, 0.01, size=2), 0.97, 1.03)
        scale[key] = (common * float(sides[0]), common * float(sides[1]))
        shift[key] = (float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)))
        mhu[key] = float(rng.uniform(-6, 6))
    return Subject(
        zs=zs,
        s=s,
        bone_s=s * (1.06 if male else 1.0),
        muscle_s=(1.08 if male else 1.0) * (1.0 - 0.4 * (params.fat_fraction - 0.25)),
        fat_mm=params.fat_fraction * (68.0 if not male else 48.0) * params.size,
        midline_x_mm=float(rng.uniform(-12, 12)),
        center_y_mm=float(rng.uniform(-8, 8)),
        rot_rad=math.radians(float(rng.uniform(-2.0, 2.0))),
        knee_shift_mm=float(rng.uniform(-10, 10)),
        muscle_scale=scale,
        muscle_shift=shift,
        muscle_hu=mhu,
    )


# --------------------------------------------------------------------------- geometry helpers


def smoothstep(t: np.ndarray | float) -> np.ndarray | float:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class Femur:
    """Femoral landmarks of one subject (left-side u, y, z in mm)."""

    def __init__(self, subj: Subject) -> None:
        s, zs = subj.bone_s, subj.zs
        p = lambda v: np.array([v[0] * subj.s, v[1] * subj.s, v[2] * zs])  # noqa: E731
        self.head = p(anat.FEMORAL_HEAD_CENTER_MM)
        self.head_r = anat.FEMORAL_HEAD_RADIUS_MM * s
        self.neck_base = p(anat.NECK_BASE_MM)
        self.neck_r = anat.NECK_RADIUS_MM * s
        self.gt = p(anat.GREATER_TROCHANTER_MM)
        self.gt_semi = np.array(anat.GREATER_TROCHANTER_SEMI_MM) * np.array([s, s, zs])
        self.lt = p(anat.LESSER_TROCHANTER_MM)
        self.lt_semi = np.array(anat.LESSER_TROCHANTER_SEMI_MM) * np.array([s, s, zs])
        self.top = p(anat.SHAFT_TOP_MM)
        self.bottom = p(anat.SHAFT_BOTTOM_MM) + np.array([subj.knee_shift_mm, 0.0, 0.0])
        self.shaft_top_z = anat.SHAFT_TOP_Z_MM * zs
        self.shaft_r = anat.SHAFT_RADIUS_MM * s
        self.zs = zs

    def axis(self, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        t = (np.asarray(z, dtype=float) - self.top[2]) / (self.bottom[2] - self.top[2])
        return self.top[0] + t * (self.bottom[0] - self.top[0]), self.top[1] + t * (self.bottom[1] - self.top[1])

    def shaft_profile(self, z: float) -> tuple[float, float, float, float, float]:
        """(semi_u, semi_y, y_shift, cortex_mm, flare 0..1) of the shaft section at z."""
        zs = self.zs
        prox = float(smoothstep((z - (-170.0 * zs)) / (60.0 * zs)))
        dist = float(smoothstep(((-420.0 * zs) - z) / (70.0 * zs)))
        r = self.shaft_r
        semi_u = r + 8.0 * prox * r / 14.0 + 26.0 * dist * r / 14.0
        semi_y = r + 6.0 * prox * r / 14.0 + 14.0 * dist * r / 14.0
        cortex = anat.CORTEX_MM * r / 14.0 * (1.0 - 0.65 * max(prox, dist))
        return semi_u, semi_y, 8.0 * dist, cortex, max(prox, dist)


def seg_dist(u: np.ndarray, y: np.ndarray, z: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (u, y, z) to the segment a-b (3-D)."""
    ab = b - a
    t = ((u - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((u - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)


def _ellipsoid(u: np.ndarray, y: np.ndarray, z: float, c: np.ndarray, semi: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    su, sy, sz = (max(v - shrink, 0.5) for v in semi)
    return ((u - c[0]) / su) ** 2 + ((y - c[1]) / sy) ** 2 + ((z - c[2]) / sz) ** 2 <= 1.0


def interp_rows(z: float, rows: tuple[tuple[float, ...], ...], zs: float) -> tuple[float, ...] | None:
    """Linear interpolation of table rows (first column z, descending) at z; None outside."""
    zz = np.array([r[0] for r in rows]) * zs
    if z > zz[0] or z < zz[-1]:
        return None
    vals = np.array([r[1:] for r in rows], dtype=float)
    return tuple(float(np.interp(-z, -zz, vals[:, j])) for j in range(vals.shape[1]))


# --------------------------------------------------------------------------- muscle tracks


@dataclass(frozen=True)
class Track:
    key: str
    present: np.ndarray  # bool per slice
    u: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    rot: np.ndarray


def muscle_tracks(z: np.ndarray, subj: Subject, femur: Femur) -> dict[str, tuple[Track, Track]]:
    tracks: dict[str, tuple[Track, Track]] = {}
    for key, frames in anat.MUSCLES:
        kz = np.array([f.z for f in frames]) * subj.zs
        fu, fy = femur.axis(kz)
        du, dy = subj.muscle_shift[key]
        u = np.array([f.u * subj.s + (fu[i] if f.anchor == "femur" else 0.0) for i, f in enumerate(frames)]) + du
        y = np.array([f.y * subj.s + (fy[i] if f.anchor == "femur" else 0.0) for i, f in enumerate(frames)]) + dy
        a = np.array([f.a for f in frames]) * subj.s * subj.muscle_s
        b = np.array([f.b for f in frames]) * subj.s * subj.muscle_s
        rot = np.radians([f.rot_deg for f in frames])
        order = np.argsort(kz)
        kz = kz[order]
        present = (z >= kz[0]) & (z <= kz[-1])
        zc = np.clip(z, kz[0], kz[-1])
        vals = [PchipInterpolator(kz, v[order])(zc) for v in (u, y, a, b, rot)]
        pair = []
        for side_i in range(2):
            sc = subj.muscle_scale[key][side_i]
            pair.append(Track(key, present, vals[0], vals[1], vals[2] * sc, vals[3] * sc, vals[4]))
        tracks[key] = (pair[0], pair[1])
    return tracks


# --------------------------------------------------------------------------- bones


def _put_bone(tis: np.ndarray, lab: np.ndarray, outer: np.ndarray, inner: np.ndarray, label_id: int, core: int) -> None:
    tis[outer] = CORTEX
    tis[outer & inner] = core
    lab[outer] = label_id


def draw_femur(tis: np.ndarray, lab: np.ndarray, u: np.ndarray, y: np.ndarray, z: float, f: Femur, fid: int) -> None:
    outer = np.zeros(u.shape, dtype=bool)
    inner = np.zeros(u.shape, dtype=bool)
    marrow = np.zeros(u.shape, dtype=bool)
    h = f.head
    if abs(z - h[2]) < f.head_r:
        d2 = (u - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2
        outer |= d2 <= f.head_r**2
        inner |= d2 <= (f.head_r - 2.0) ** 2
    if f.neck_base[2] - f.neck_r <= z <= h[2] + f.neck_r:
        d = seg_dist(u, y, z, h, f.neck_base)
        outer |= d <= f.neck_r
        inner |= d <= f.neck_r - 2.5
    for c, semi in ((f.gt, f.gt_semi), (f.lt, f.lt_semi)):
        if abs(z - c[2]) < semi[2]:
            outer |= _ellipsoid(u, y, z, c, semi)
            inner |= _ellipsoid(u, y, z, c, semi, shrink=2.0)
    if z <= f.shaft_top_z:
        au, ay = f.axis(z)
        semi_u, semi_y, y_shift, cortex, flare = f.shaft_profile(z)
        e = ((u - au) / semi_u) ** 2 + ((y - ay - y_shift) / semi_y) ** 2
        outer |= e <= 1.0
        ei = ((u - au) / (semi_u - cortex)) ** 2 + ((y - ay - y_shift) / (semi_y - cortex)) ** 2
        inside = ei <= 1.0
        inner |= inside
        if flare < 0.35:
            marrow |= inside
    if outer.any():
        _put_bone(tis, lab, outer, inner, fid, CANCELLOUS)
        tis[outer & marrow] = MARROW


def _bezier_dist(u: np.ndarray, y: np.ndarray, p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, reach: float, n: int = 24) -> np.ndarray:
    """Distance to a quadratic Bezier curve (polyline of n points); inf beyond ``reach`` of its box."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    lo, hi = pts.min(axis=0) - reach, pts.max(axis=0) + reach
    roi = (u >= lo[0]) & (u <= hi[0]) & (y >= lo[1]) & (y <= hi[1])
    out = np.full(u.shape, np.inf)
    uu, yy = u[roi], y[roi]
    best = np.full(uu.shape, np.inf)
    for i in range(n - 1):
        best = np.minimum(best, seg_dist(uu, yy, 0.0, np.r_[pts[i], 0.0], np.r_[pts[i + 1], 0.0]))
    out[roi] = best
    return out


def draw_ilium(
    tis: np.ndarray, lab: np.ndarray, u: np.ndarray, y: np.ndarray, z: float, f: Femur, subj: Subject, iid: int
) -> None:
    s, zs = subj.s, subj.zs
    rows = anat.ILIUM_WING
    zz = np.array([r[0] for r in rows]) * zs
    if zz[-1] <= z <= zz[0]:
        vals = np.array([[*r[1], *r[2], *r[3], r[4]] for r in rows])
        v = [float(np.interp(-z, -zz, vals[:, j])) for j in range(vals.shape[1])]
        p0, p1, p2 = np.array(v[0:2]) * s, np.array(v[2:4]) * s, np.array(v[4:6]) * s
        half = v[6] * s / 2.0
        d = _bezier_dist(u, y, p0, p1, p2, reach=half + 1.0)
        outer = d <= half
        _put_bone(tis, lab, outer, d <= half - 1.8, iid, CANCELLOUS)
    # acetabulum: a shell around the femoral head, open laterally
    h, r = f.head, f.head_r
    if abs(z - h[2]) < r + 9.0:
        dist = np.sqrt((u - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2)
        shell = (dist >= r + 1.5) & (dist <= r + 9.0 * s) & ((u - h[0]) < 0.35 * (z - h[2]) + 4.0 + 0.5 * r)
        if shell.any():
            label_id = iid if z > h[2] - 4.0 * zs else 0
            _put_bone(tis, lab, shell, (dist >= r + 3.0) & (dist <= r + 7.0 * s), label_id, CANCELLOUS)


def draw_axial_bones(
    tis: np.ndarray, lab: np.ndarray, xb: np.ndarray, yb: np.ndarray, u_side: tuple[np.ndarray, np.ndarray], z: float, subj: Subject
) -> None:
    s, zs = subj.s, subj.zs
    row = interp_rows(z, anat.SACRUM, zs)
    if row is not None:
        cy, a, b = row[0] * s, row[1] * s, row[2] * s
        e = (xb / a) ** 2 + ((yb - cy) / b) ** 2
        outer = e <= 1.0
        if z > -40.0 * zs:  # spinous process / median sacral crest
            outer |= (xb / (5.0 * s)) ** 2 + ((yb - cy - b - 14.0 * s) / (16.0 * s)) ** 2 <= 1.0
        inner = (xb / max(a - 2.0, 1.0)) ** 2 + ((yb - cy) / max(b - 2.0, 1.0)) ** 2 <= 1.0
        _put_bone(tis, lab, outer, inner, 0, CANCELLOUS)
    for p0, p1, radius in anat.RAMI:
        a = np.array([p0[0] * s, p0[1] * s, p0[2] * zs])
        b = np.array([p1[0] * s, p1[1] * s, p1[2] * zs])
        rr = radius * s
        if min(a[2], b[2]) - rr <= z <= max(a[2], b[2]) + rr:
            for u in u_side:
                d = seg_dist(u, yb, z, a, b)
                outer = d <= rr
                if outer.any():
                    _put_bone(tis, lab, outer, d <= rr - 2.0, 0, CANCELLOUS)
