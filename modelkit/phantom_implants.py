"""Implants of hip surgery in a phantom: where the metal (and the plastic of a bipolar head) lies.

Five kinds (``PhantomParams.implant_kind``), placed on the subject's femur (:class:`Femur`,
left-side ``u, y, z`` mm, mirrored for the right side):

- ``total_hip``: femoral head, neck and tapered stem plus an acetabular cup;
- ``hemi``: hemiarthroplasty, a bipolar head of the native head's size (metal shell, polyethylene
  layer, inner metal head), neck and stem, no cup;
- ``nail``: cephalomedullary nail entering at the greater trochanter tip and running down the
  canal, short (~200 mm) or long (to ~45 mm above the knee), with a lag screw along the neck axis
  into the head and a distal locking bolt;
- ``screws``: three parallel cannulated screws (7 mm, 3 mm hollow core) along the neck axis from
  the lateral cortex into the head, in an inverted triangle;
- ``dhs``: dynamic hip screw, a 12 mm lag screw along the neck into the head, a barrel, and a 5 mm
  side plate on the lateral cortex fixed by four 4.5 mm cortical screws across the shaft.

Sizes that vary between patients (nail length and diameter) come from a stream of their own seeded
by ``params.seed``, so a phantom without implant consumes no extra random number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelkit.phantom_shapes import Femur, Subject

if TYPE_CHECKING:
    from modelkit.phantom_types import PhantomParams

LAG_SCREW_TIP_APEX_MM = 10.0  # distance of a lag screw's tip from the head surface


@dataclass(frozen=True)
class Rod:
    """A capsule along segment a-b (left-side u, y, z mm); radius from r_a at a to r_b at b; an
    optional hollow core (cannulated screw) of radius ``core_mm`` along the open segment."""

    a: np.ndarray
    b: np.ndarray
    r_a_mm: float
    r_b_mm: float
    core_mm: float = 0.0

    def z_range(self) -> tuple[float, float]:
        r = max(self.r_a_mm, self.r_b_mm)
        return min(self.a[2], self.b[2]) - r, max(self.a[2], self.b[2]) + r

    def mask(self, u: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        ab = self.b - self.a
        t_raw = ((u - self.a[0]) * ab[0] + (y - self.a[1]) * ab[1] + (z - self.a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t_raw, 0.0, 1.0)
        d = np.sqrt((u - self.a[0] - t * ab[0]) ** 2 + (y - self.a[1] - t * ab[1]) ** 2 + (z - self.a[2] - t * ab[2]) ** 2)
        m = d <= self.r_a_mm + t * (self.r_b_mm - self.r_a_mm)
        if self.core_mm > 0:
            m &= ~((d <= self.core_mm) & (t_raw > 0.0) & (t_raw < 1.0))
        return m


@dataclass(frozen=True)
class Shell:
    """Points at r_in..r_out mm from centre c; with ``max_du`` only where u - c_u < max_du (a cup)."""

    c: np.ndarray
    r_in_mm: float
    r_out_mm: float
    max_du_mm: float = math.inf

    def z_range(self) -> tuple[float, float]:
        return self.c[2] - self.r_out_mm, self.c[2] + self.r_out_mm

    def mask(self, u: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        dist = np.sqrt((u - self.c[0]) ** 2 + (y - self.c[1]) ** 2 + (z - self.c[2]) ** 2)
        return (dist >= self.r_in_mm) & (dist <= self.r_out_mm) & ((u - self.c[0]) < self.max_du_mm)


@dataclass(frozen=True)
class Plate:
    """A side plate lying on the lateral cortex of the shaft from z_bottom to z_top: thickness in u
    (outward from the cortex), width in y around the shaft's centre line."""

    femur: Femur
    z_bottom_mm: float
    z_top_mm: float
    thick_mm: float
    width_mm: float

    def z_range(self) -> tuple[float, float]:
        return self.z_bottom_mm, self.z_top_mm

    def mask(self, u: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        u_lat, y_c = lateral_cortex(self.femur, z)
        return (u >= u_lat) & (u <= u_lat + self.thick_mm) & (np.abs(y - y_c) <= self.width_mm / 2.0)


def lateral_cortex(f: Femur, z: float) -> tuple[float, float]:
    """(u of the shaft's lateral surface, y of the shaft's centre line) at z."""
    au, ay = f.axis(z)
    semi_u, _, y_shift, _, _ = f.shaft_profile(z)
    return float(au) + semi_u, float(ay) + y_shift


def _neck_frame(f: Femur) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors: d along the neck axis (head -> lateral, inferior), e_sup superior and e_ap
    anterior-posterior, both perpendicular to d."""
    d = f.neck_base - f.head
    d = d / np.linalg.norm(d)
    e_sup = np.array([0.0, 0.0, 1.0]) - d[2] * d
    e_sup /= np.linalg.norm(e_sup)
    return d, e_sup, np.cross(d, e_sup)


def _lateral_exit(f: Femur, start: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Where the line start + s d (s >= 0) first reaches the shaft's lateral surface."""
    for s in np.arange(0.0, 160.0, 0.5):
        p = start + s * d
        if p[2] <= f.shaft_top_z + 20.0 and p[0] >= lateral_cortex(f, float(p[2]))[0]:
            return p
    raise AssertionError("neck axis never reaches the lateral cortex")  # geometry tables are fixed


def _stem_parts(f: Femur, subj: Subject) -> list:
    stem_end_z = -250.0 * subj.zs
    stem_end = np.array([*(float(v) for v in f.axis(stem_end_z)), stem_end_z])
    stem_top = np.array([*(float(v) for v in f.axis(f.neck_base[2])), f.neck_base[2]])
    return [Rod(f.head, f.neck_base, 8.0, 8.0), Rod(stem_top, stem_end, 9.0, 5.0)]


def _total_hip(f: Femur, subj: Subject) -> tuple[list, list]:
    h, r = f.head, f.head_r
    head = Shell(h, 0.0, r - 2.0)
    cup = Shell(h, r + 0.5, r + 4.0, max_du_mm=0.2 * r)
    return [head, cup, *_stem_parts(f, subj)], []


def _hemi(f: Femur, subj: Subject) -> tuple[list, list]:
    h, r = f.head, f.head_r
    inner = min(14.0, 0.6 * r)
    metal = [Shell(h, r - 3.5, r - 0.5), Shell(h, 0.0, inner), *_stem_parts(f, subj)]
    return metal, [Shell(h, inner, r - 3.5)]


def _nail(f: Femur, subj: Subject, rng: np.random.Generator) -> tuple[list, list]:
    zs = subj.zs
    long = bool(rng.random() < 0.5)
    r_nail = float(rng.uniform(5.5, 6.5))
    top_z = f.gt[2] + f.gt_semi[2] + 3.0
    au, ay = f.axis(top_z)
    top = np.array([0.5 * (f.gt[0] + float(au)), 0.5 * (f.gt[1] + float(ay)), top_z])
    joint_z = top_z - 80.0 * zs
    joint = np.array([*(float(v) for v in f.axis(joint_z)), joint_z])
    end_z = -475.0 * zs if long else top_z - 200.0
    end = np.array([*(float(v) for v in f.axis(end_z)), end_z])
    d, _, _ = _neck_frame(f)
    exit_ = _lateral_exit(f, f.head, d) + 4.0 * d
    tip = f.head - (f.head_r - LAG_SCREW_TIP_APEX_MM) * d
    lock_z = end_z + 30.0
    lau, lay = f.axis(lock_z)
    semi_u = f.shaft_profile(lock_z)[0]
    lock = Rod(np.array([float(lau) + semi_u + 4.0, float(lay), lock_z]), np.array([float(lau) - semi_u - 3.0, float(lay), lock_z]), 2.5, 2.5)
    return [Rod(top, joint, 8.0, r_nail), Rod(joint, end, r_nail, r_nail), Rod(exit_, tip, 5.25, 5.25), lock], []


def _screws(f: Femur, subj: Subject) -> tuple[list, list]:
    d, e_sup, e_ap = _neck_frame(f)
    o = 0.5 * f.neck_r
    parts = []
    for off in (-o * e_sup, o * (0.5 * e_sup + 0.87 * e_ap), o * (0.5 * e_sup - 0.87 * e_ap)):
        tip = f.head + off - (f.head_r - 6.0) * d
        start = _lateral_exit(f, f.head + off, d) + 3.0 * d
        parts.append(Rod(start, tip, 3.5, 3.5, core_mm=1.5))
        parts.append(Rod(start, start + 3.0 * d, 4.5, 4.5))  # screw head / washer on the cortex
    return parts, []


def _dhs(f: Femur, subj: Subject) -> tuple[list, list]:
    zs = subj.zs
    d, _, _ = _neck_frame(f)
    exit_ = _lateral_exit(f, f.head, d)
    tip = f.head - (f.head_r - LAG_SCREW_TIP_APEX_MM) * d
    barrel_out = exit_ + 5.0 * d
    parts: list = [Rod(barrel_out, barrel_out - 40.0 * d, 6.5, 6.5), Rod(barrel_out - 38.0 * d, tip, 6.0, 6.0)]
    z_top = float(exit_[2]) + 8.0
    holes = [z_top - 26.0 * zs - 16.0 * i for i in range(4)]
    parts.append(Plate(f, holes[-1] - 12.0, z_top, 5.0, 16.0))
    for hz in holes:
        u_lat, y_c = lateral_cortex(f, hz)
        au = float(f.axis(hz)[0])
        parts.append(Rod(np.array([u_lat + 6.5, y_c, hz]), np.array([2.0 * au - u_lat - 3.0, y_c, hz]), 2.25, 2.25))
    return parts, []


def implant_parts(params: PhantomParams, subj: Subject) -> tuple[list, list]:
    """(metal parts, plastic parts) of the implant kind, on the left femur's frame."""
    f = Femur(subj)
    kind = params.implant_kind
    if kind == "total_hip":
        return _total_hip(f, subj)
    if kind == "hemi":
        return _hemi(f, subj)
    if kind == "nail":
        return _nail(f, subj, np.random.default_rng([params.seed, 97]))
    if kind == "screws":
        return _screws(f, subj)
    if kind == "dhs":
        return _dhs(f, subj)
    raise ValueError(f"implant_kind {kind!r} has no geometry")  # PhantomParams validates it


def implant_masks(
    params: PhantomParams, subj: Subject, z: np.ndarray, xb: np.ndarray, yb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (metal, plastic) volumes (k, r, c) of ``params.implant`` on grid slices ``z``; ``xb``,
    ``yb`` are the body-frame coordinates (r, c) of a slice (x toward the patient's left)."""
    metal = np.zeros((len(z), *xb.shape), dtype=bool)
    plastic = np.zeros_like(metal)
    if params.implant is None:
        return metal, plastic
    metal_parts, plastic_parts = implant_parts(params, subj)
    sides = ("left", "right") if params.implant == "both" else (params.implant,)
    for side in sides:
        u = xb if side == "left" else -xb
        for out, parts in ((metal, metal_parts), (plastic, plastic_parts)):
            for part in parts:
                lo, hi = part.z_range()
                for k in np.flatnonzero((z >= lo - 1e-6) & (z <= hi + 1e-6)):
                    out[k] |= part.mask(u, yb, float(z[k]))
    plastic &= ~metal
    return metal, plastic
