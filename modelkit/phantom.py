"""Labelled thigh/hip CT phantoms: synthetic subjects with exactly known muscle volumes.

A phantom is a CT volume in Hounsfield units plus a label map of the structures of
config/labels.toml, from just above the iliac crest (z = 0 at the crest) down to the
knee joint, both legs. It feeds the model's training data, the tests of every stage
and the end-to-end checks of the node (DICOM in, known volumes out).

Volume convention (pipeline/types.py): arrays indexed ``(k, r, c)``; ``affine_lps``
maps ``(k, r, c, 1)`` to LPS mm. Phantoms use the standard head-first-supine axial
layout: ``k`` ascending toward superior (z), ``r`` toward posterior (y), ``c`` toward
the patient's left (x), so ``affine_lps = [[0, 0, dx, x0], [0, dy, 0, y0], [dz, 0, 0, z0],
[0, 0, 0, 1]]``. Labels carry no side; a voxel belongs to the patient's LEFT side when
its x is greater than ``midline_x_mm`` and to the RIGHT side otherwise (that is how
the ground truth counts, and how atrophy picks its side).

Anatomy (modelkit/phantom_anatomy.py) is built per axial slice: a body/leg envelope,
bones from simple solids (femur: head sphere, neck cylinder, trochanter ellipsoids,
shaft with flares; ilium: curved plate plus acetabular roof), and muscles as ellipses
whose centre, semi-axes and rotation are smooth functions of z; envelope voxels go to
the muscle with the smallest ellipse-normalised distance. Muscle boundaries carry a
one-voxel fat septum (partial-volume HU, label kept).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from modelkit import phantom_anatomy as anat
from pipeline.labels import LabelTable, load_label_table

logger = logging.getLogger(__name__)

SIDES = ("left", "right")
SEXES = ("F", "M")

# Tissue classes of the internal tissue map (rendered to HU at the end).
_AIR, _FAT, _SKIN, _MUSCLE, _SEPTUM, _CORTEX, _CANCELLOUS, _MARROW, _VISCERA, _METAL, _TABLE = range(11)
_TISSUE_HU = np.array([-1000.0, -98.0, 25.0, 48.0, -45.0, 1450.0, 260.0, 45.0, 28.0, 3500.0, -350.0], dtype=np.float32)

_LABEL_FEMUR = "femur"
_LABEL_ILIUM = "ilium"
METAL_NEAR_MM = 20.0


class PhantomError(ValueError):
    """Invalid phantom parameters."""


@dataclass(frozen=True)
class PhantomParams:
    """What a synthetic subject looks like.

    ``atrophy`` maps ``"<label_key>"`` (both sides) or ``"<label_key>:left"`` /
    ``"<label_key>:right"`` to the remaining volume fraction (0..1]: 0.8 = 20 % loss.
    ``fov_top_mm`` / ``fov_bottom_mm`` cut the scan (z kept, mm relative to the iliac
    crest, negative downward). ``spacing_mm`` is (dz, dy, dx). ``seed`` fixes the
    subject (anatomy, position); ``scan_seed`` (default: ``seed``) the image noise and
    texture, so a follow-up scan of the same subject uses the same ``seed`` and another
    ``scan_seed``.
    """

    seed: int
    sex: str = "F"
    height_m: float = 1.65
    size: float = 1.0
    fat_fraction: float = 0.25
    atrophy: Mapping[str, float] = field(default_factory=dict)
    implant: str | None = None
    fov_top_mm: float | None = None
    fov_bottom_mm: float | None = None
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    noise_hu: float = 12.0
    scan_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise PhantomError(f"PhantomParams.seed must be an integer >= 0; got {self.seed!r}")
        if self.sex not in SEXES:
            raise PhantomError(f"PhantomParams.sex is {self.sex!r}; allowed: {SEXES}")
        if not 1.3 <= float(self.height_m) <= 2.1:
            raise PhantomError(f"PhantomParams.height_m is {self.height_m!r}; allowed: 1.3 .. 2.1")
        if not 0.7 <= float(self.size) <= 1.4:
            raise PhantomError(f"PhantomParams.size is {self.size!r}; allowed: 0.7 .. 1.4 (girth scale)")
        if not 0.05 <= float(self.fat_fraction) <= 0.6:
            raise PhantomError(f"PhantomParams.fat_fraction is {self.fat_fraction!r}; allowed: 0.05 .. 0.6")
        object.__setattr__(self, "atrophy", dict(self.atrophy))
        for key, value in self.atrophy.items():
            name, _, side = str(key).partition(":")
            if not name or (side and side not in SIDES):
                raise PhantomError(
                    f"PhantomParams.atrophy key {key!r} is malformed; allowed: '<label_key>' or '<label_key>:left|right'"
                )
            if not 0.0 < float(value) <= 1.0:
                raise PhantomError(
                    f"PhantomParams.atrophy[{key!r}] is {value!r}; allowed: remaining volume fraction in (0, 1]"
                )
        if self.implant not in (None, "left", "right"):
            raise PhantomError(f"PhantomParams.implant is {self.implant!r}; allowed: None, 'left', 'right'")
        top = self.fov_top_mm if self.fov_top_mm is not None else math.inf
        bottom = self.fov_bottom_mm if self.fov_bottom_mm is not None else -math.inf
        if not top - bottom >= 20.0:
            raise PhantomError(
                f"PhantomParams.fov_top_mm={self.fov_top_mm!r} / fov_bottom_mm={self.fov_bottom_mm!r}: "
                "the kept range must be at least 20 mm with top above bottom"
            )
        knee_z = -520.0 * float(self.height_m) / 1.65
        if self.fov_top_mm is not None and not knee_z + 20.0 <= self.fov_top_mm:
            raise PhantomError(
                f"PhantomParams.fov_top_mm is {self.fov_top_mm!r}; allowed: >= {knee_z + 20.0:.0f} mm "
                "(20 mm above the knee for this height)"
            )
        if self.fov_bottom_mm is not None and not self.fov_bottom_mm <= -10.0:
            raise PhantomError(f"PhantomParams.fov_bottom_mm is {self.fov_bottom_mm!r}; allowed: <= -10 mm")
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(0.3 <= s <= 8.0 for s in spacing):
            raise PhantomError(f"PhantomParams.spacing_mm is {self.spacing_mm!r}; allowed: three values 0.3 .. 8.0 mm")
        object.__setattr__(self, "spacing_mm", spacing)
        if self.scan_seed is not None and (not isinstance(self.scan_seed, (int, np.integer)) or self.scan_seed < 0):
            raise PhantomError(f"PhantomParams.scan_seed must be None or an integer >= 0; got {self.scan_seed!r}")
        if not 0.0 <= float(self.noise_hu) <= 200.0:
            raise PhantomError(f"PhantomParams.noise_hu is {self.noise_hu!r}; allowed: 0 .. 200")

    def to_record(self) -> dict:
        rec = asdict(self)
        rec["atrophy"] = dict(self.atrophy)
        rec["spacing_mm"] = list(self.spacing_mm)
        return rec


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume with its exact label map.

    ``hu`` float32 and ``labels`` uint8 (ids of the label table, 0 = background), both
    ``(k, r, c)``; ``affine_lps`` 4x4 mm (module docstring). ``metal_structures``: label
    keys within 20 mm of implant metal (empty without implant). Metal voxels are label 0.
    """

    hu: np.ndarray
    labels: np.ndarray
    affine_lps: np.ndarray
    params: PhantomParams
    midline_x_mm: float
    metal_structures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.hu.shape != self.labels.shape or self.hu.ndim != 3:
            raise PhantomError(f"Phantom.hu {self.hu.shape} and labels {self.labels.shape} must be equal 3-D shapes")
        for name in ("hu", "labels", "affine_lps"):
            arr = np.asarray(getattr(self, name))
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine_lps[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_lps[:3, :3]))) / 1000.0

    def side_of_columns(self) -> np.ndarray:
        """Boolean per column c: True where the column lies on the patient's left."""
        return _left_columns(self.affine_lps, self.hu.shape[2], self.midline_x_mm)

    def ground_truth(self, labels: LabelTable | None = None) -> dict:
        return ground_truth(self, labels)


def _left_columns(affine_lps: np.ndarray, n_cols: int, midline_x_mm: float) -> np.ndarray:
    x = affine_lps[0, 3] + affine_lps[0, 2] * np.arange(n_cols)
    return x > midline_x_mm


def ground_truth(phantom: Phantom, labels: LabelTable | None = None) -> dict:
    """Per structure key and side: voxel_count and volume_ml, from the label map.

    Returns ``{"params", "spacing_mm", "shape", "midline_x_mm", "voxel_volume_ml",
    "structures": {key: {"left": {...}, "right": {...}}}, "absent": [keys with no voxel],
    "metal_structures": [...]}``.
    """
    table = labels if labels is not None else load_label_table()
    n = len(table.labels) + 1
    left = phantom.side_of_columns()
    lab = phantom.labels
    counts_left = np.bincount(lab[:, :, left].ravel(), minlength=n)
    counts_right = np.bincount(lab[:, :, ~left].ravel(), minlength=n)
    vml = phantom.voxel_volume_ml
    structures: dict[str, dict[str, dict[str, float | int]]] = {}
    absent = []
    for label in table.labels:
        entry = {}
        for side, counts in (("left", counts_left), ("right", counts_right)):
            count = int(counts[label.id]) if label.id < len(counts) else 0
            entry[side] = {"voxel_count": count, "volume_ml": round(count * vml, 4)}
        structures[label.key] = entry
        if entry["left"]["voxel_count"] + entry["right"]["voxel_count"] == 0:
            absent.append(label.key)
    return {
        "params": phantom.params.to_record(),
        "spacing_mm": list(phantom.spacing_mm),
        "shape": list(phantom.hu.shape),
        "affine_lps": phantom.affine_lps.tolist(),
        "midline_x_mm": phantom.midline_x_mm,
        "voxel_volume_ml": vml,
        "structures": structures,
        "absent": absent,
        "metal_structures": list(phantom.metal_structures),
    }


# --------------------------------------------------------------------------- subject


@dataclass(frozen=True)
class _Subject:
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


def _draw_subject(params: PhantomParams, rng: np.random.Generator) -> _Subject:
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
    return _Subject(
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


def _smoothstep(t: np.ndarray | float) -> np.ndarray | float:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Femur:
    """Femoral landmarks of one subject (left-side u, y, z in mm)."""

    def __init__(self, subj: _Subject) -> None:
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
        prox = float(_smoothstep((z - (-170.0 * zs)) / (60.0 * zs)))
        dist = float(_smoothstep(((-420.0 * zs) - z) / (70.0 * zs)))
        r = self.shaft_r
        semi_u = r + 8.0 * prox * r / 14.0 + 26.0 * dist * r / 14.0
        semi_y = r + 6.0 * prox * r / 14.0 + 14.0 * dist * r / 14.0
        cortex = anat.CORTEX_MM * r / 14.0 * (1.0 - 0.65 * max(prox, dist))
        return semi_u, semi_y, 8.0 * dist, cortex, max(prox, dist)


def _seg_dist(u: np.ndarray, y: np.ndarray, z: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (u, y, z) to the segment a-b (3-D)."""
    ab = b - a
    t = ((u - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((u - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)


def _ellipsoid(u: np.ndarray, y: np.ndarray, z: float, c: np.ndarray, semi: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    su, sy, sz = (max(v - shrink, 0.5) for v in semi)
    return ((u - c[0]) / su) ** 2 + ((y - c[1]) / sy) ** 2 + ((z - c[2]) / sz) ** 2 <= 1.0


def _interp_rows(z: float, rows: tuple[tuple[float, ...], ...], zs: float) -> tuple[float, ...] | None:
    """Linear interpolation of table rows (first column z, descending) at z; None outside."""
    zz = np.array([r[0] for r in rows]) * zs
    if z > zz[0] or z < zz[-1]:
        return None
    vals = np.array([r[1:] for r in rows], dtype=float)
    return tuple(float(np.interp(-z, -zz, vals[:, j])) for j in range(vals.shape[1]))


# --------------------------------------------------------------------------- muscle tracks


@dataclass(frozen=True)
class _Track:
    key: str
    present: np.ndarray  # bool per slice
    u: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    rot: np.ndarray


def _muscle_tracks(z: np.ndarray, subj: _Subject, femur: _Femur) -> dict[str, tuple[_Track, _Track]]:
    tracks: dict[str, tuple[_Track, _Track]] = {}
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
            pair.append(_Track(key, present, vals[0], vals[1], vals[2] * sc, vals[3] * sc, vals[4]))
        tracks[key] = (pair[0], pair[1])
    return tracks


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Grid:
    z: np.ndarray  # per slice, ascending
    x: np.ndarray  # per column
    y: np.ndarray  # per row
    spacing_mm: tuple[float, float, float]

    @property
    def affine_lps(self) -> np.ndarray:
        dz, dy, dx = self.spacing_mm
        return np.array(
            [[0.0, 0.0, dx, self.x[0]], [0.0, dy, 0.0, self.y[0]], [dz, 0.0, 0.0, self.z[0]], [0.0, 0.0, 0.0, 1.0]]
        )


def _make_grid(params: PhantomParams, subj: _Subject) -> _Grid:
    dz, dy, dx = params.spacing_mm
    top = anat.TOP_Z_MM * subj.zs
    bottom = anat.KNEE_Z_MM * subj.zs
    if params.fov_top_mm is not None:
        top = min(top, params.fov_top_mm)
    if params.fov_bottom_mm is not None:
        bottom = max(bottom, params.fov_bottom_mm)
    if top - bottom < dz:
        raise PhantomError(
            f"PhantomParams.fov_top_mm={params.fov_top_mm!r} / fov_bottom_mm={params.fov_bottom_mm!r} keep no slice "
            f"of the anatomy ({anat.KNEE_Z_MM * subj.zs:.0f} .. {anat.TOP_Z_MM * subj.zs:.0f} mm)"
        )
    n_k = int(math.floor((top - bottom) / dz + 1e-6)) + 1
    z = bottom + dz * np.arange(n_k)
    half = 200.0 * subj.s + subj.fat_mm + 30.0
    fov = 20.0 * math.ceil(2.0 * half / 20.0)
    n_c = int(math.ceil(fov / dx))
    n_r = int(math.ceil(fov / dy))
    x = (np.arange(n_c) - (n_c - 1) / 2.0) * dx
    y = (np.arange(n_r) - (n_r - 1) / 2.0) * dy + 10.0 * subj.s
    return _Grid(z=z, x=x, y=y, spacing_mm=(dz, dy, dx))


def _muscle_threshold(z: float, zs: float) -> float:
    """Largest ellipse-normalised distance a voxel may have to belong to a muscle."""
    fill = float(_smoothstep((-150.0 * zs - z) / (80.0 * zs)))
    knee = float(_smoothstep((z - (-500.0 * zs)) / (60.0 * zs)))
    return 1.0 + 1.8 * fill * (0.3 + 0.7 * knee)


def _build_slices(
    params: PhantomParams, subj: _Subject, grid: _Grid, table: LabelTable
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue class and label per voxel."""
    n_k, n_r, n_c = len(grid.z), len(grid.y), len(grid.x)
    tissue = np.zeros((n_k, n_r, n_c), dtype=np.uint8)
    labels = np.zeros((n_k, n_r, n_c), dtype=np.uint8)
    femur = _Femur(subj)
    tracks = _muscle_tracks(grid.z, subj, femur)
    key_ids = {label.key: label.id for label in table.labels}
    muscle_keys = [key for key, _ in anat.MUSCLES]
    muscle_label = np.array([key_ids.get(key, 0) for key in muscle_keys], dtype=np.uint8)
    femur_id = key_ids.get(_LABEL_FEMUR, 0)
    ilium_id = key_ids.get(_LABEL_ILIUM, 0)
    zs, s = subj.zs, subj.s

    X, Y = np.meshgrid(grid.x, grid.y)  # (r, c)
    cr, sr = math.cos(subj.rot_rad), math.sin(subj.rot_rad)
    xb = cr * (X - subj.midline_x_mm) + sr * (Y - subj.center_y_mm)
    yb = -sr * (X - subj.midline_x_mm) + cr * (Y - subj.center_y_mm)
    u_side = (xb, -xb)  # left, right: lateral distance from the midline

    table_y = 135.0 * s + subj.fat_mm + subj.center_y_mm + 4.0
    table_rows = (grid.y >= table_y) & (grid.y < table_y + 14.0)
    table_cols = np.abs(grid.x - subj.midline_x_mm) < 0.95 * (grid.x[-1] - grid.x[0]) / 2.0

    for k, z in enumerate(grid.z):
        z = float(z)
        t_fat = subj.fat_mm * (0.8 + 0.4 * float(_smoothstep((z - anat.KNEE_Z_MM * zs) / (500.0 * zs))))
        comp = np.zeros((n_r, n_c), dtype=bool)
        body = np.zeros((n_r, n_c), dtype=bool)
        inner_skin = np.zeros((n_r, n_c), dtype=bool)
        row = _interp_rows(z, anat.BODY_OUTLINE, zs)
        if row is not None:
            a_b, b_b, yc = (row[0] - 20.0) * s, (row[1] - 20.0) * s, row[2] * s
            comp |= (xb / a_b) ** 2 + ((yb - yc) / b_b) ** 2 <= 1.0
            body |= (xb / (a_b + t_fat)) ** 2 + ((yb - yc) / (b_b + t_fat)) ** 2 <= 1.0
            inner_skin |= (xb / (a_b + t_fat - 2.0)) ** 2 + ((yb - yc) / (b_b + t_fat - 2.0)) ** 2 <= 1.0
        leg = _interp_rows(z, anat.LEG_OUTLINE, zs)
        fu, fy = femur.axis(z)
        if leg is not None:
            lu = float(fu) + anat.LEG_CENTER_OFFSET_MM[0] * s
            ly = float(fy) + anat.LEG_CENTER_OFFSET_MM[1] * s
            a_l, b_l = (leg[0] - 20.0) * s, (leg[1] - 20.0) * s
            for u in u_side:
                e = ((u - lu) / a_l) ** 2 + ((yb - ly) / b_l) ** 2
                comp |= e <= 1.0
                body |= ((u - lu) / (a_l + t_fat)) ** 2 + ((yb - ly) / (b_l + t_fat)) ** 2 <= 1.0
                inner_skin |= ((u - lu) / (a_l + t_fat - 2.0)) ** 2 + ((yb - ly) / (b_l + t_fat - 2.0)) ** 2 <= 1.0
        comp &= body
        tis = np.full((n_r, n_c), _AIR, dtype=np.uint8)
        lab = np.zeros((n_r, n_c), dtype=np.uint8)
        tis[body] = _SKIN
        tis[inner_skin & body] = _FAT
        tis[np.ix_(table_rows, table_cols)] = np.where(body[np.ix_(table_rows, table_cols)], _FAT, _TABLE)

        # pelvic cavity (viscera)
        cav = _interp_rows(z, anat.PELVIC_CAVITY, zs)
        if cav is not None:
            cy, ca, cb = cav[0] * s, cav[1] * s, cav[2] * s
            tis[comp & ((xb / ca) ** 2 + ((yb - cy) / cb) ** 2 <= 1.0)] = _VISCERA

        # muscles: smallest ellipse-normalised distance
        thr = _muscle_threshold(z, zs)
        idx = np.nonzero(comp)
        if idx[0].size:
            best = np.full(idx[0].size, np.inf, dtype=np.float32)
            best_m = np.zeros(idx[0].size, dtype=np.int16)
            for mi, key in enumerate(muscle_keys):
                for side_i, u in enumerate(u_side):
                    tr = tracks[key][side_i]
                    if not tr.present[k]:
                        continue
                    du = u[idx] - tr.u[k]
                    dv = yb[idx] - tr.y[k]
                    c, sn = math.cos(tr.rot[k]), math.sin(tr.rot[k])
                    p = (du * c + dv * sn) / tr.a[k]
                    q = (-du * sn + dv * c) / tr.b[k]
                    d = np.sqrt(p * p + q * q).astype(np.float32)
                    better = d < best
                    best[better] = d[better]
                    best_m[better] = mi
            is_m = best < thr
            rr, cc = idx[0][is_m], idx[1][is_m]
            tis[rr, cc] = _MUSCLE
            lab[rr, cc] = muscle_label[best_m[is_m]]

        # bones (override soft tissue)
        for u in u_side:
            _draw_femur(tis, lab, u, yb, z, femur, femur_id)
            _draw_ilium(tis, lab, u, yb, z, femur, subj, ilium_id)
        _draw_axial_bones(tis, lab, xb, yb, u_side, z, subj)

        # septa between different muscles (one voxel, label kept)
        muscle = tis == _MUSCLE
        edge = np.zeros_like(muscle)
        diff_c = (lab[:, 1:] != lab[:, :-1]) & muscle[:, 1:] & muscle[:, :-1]
        diff_r = (lab[1:, :] != lab[:-1, :]) & muscle[1:, :] & muscle[:-1, :]
        edge[:, 1:] |= diff_c
        edge[1:, :] |= diff_r
        tis[edge] = _SEPTUM
        tissue[k] = tis
        labels[k] = lab
    return tissue, labels


def _put_bone(tis: np.ndarray, lab: np.ndarray, outer: np.ndarray, inner: np.ndarray, label_id: int, core: int) -> None:
    tis[outer] = _CORTEX
    tis[outer & inner] = core
    lab[outer] = label_id


def _draw_femur(tis: np.ndarray, lab: np.ndarray, u: np.ndarray, y: np.ndarray, z: float, f: _Femur, fid: int) -> None:
    outer = np.zeros(u.shape, dtype=bool)
    inner = np.zeros(u.shape, dtype=bool)
    marrow = np.zeros(u.shape, dtype=bool)
    h = f.head
    if abs(z - h[2]) < f.head_r:
        d2 = (u - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2
        outer |= d2 <= f.head_r**2
        inner |= d2 <= (f.head_r - 2.0) ** 2
    if f.neck_base[2] - f.neck_r <= z <= h[2] + f.neck_r:
        d = _seg_dist(u, y, z, h, f.neck_base)
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
        _put_bone(tis, lab, outer, inner, fid, _CANCELLOUS)
        tis[outer & marrow] = _MARROW


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
        best = np.minimum(best, _seg_dist(uu, yy, 0.0, np.r_[pts[i], 0.0], np.r_[pts[i + 1], 0.0]))
    out[roi] = best
    return out


def _draw_ilium(
    tis: np.ndarray, lab: np.ndarray, u: np.ndarray, y: np.ndarray, z: float, f: _Femur, subj: _Subject, iid: int
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
        _put_bone(tis, lab, outer, d <= half - 1.8, iid, _CANCELLOUS)
    # acetabulum: a shell around the femoral head, open laterally
    h, r = f.head, f.head_r
    if abs(z - h[2]) < r + 9.0:
        dist = np.sqrt((u - h[0]) ** 2 + (y - h[1]) ** 2 + (z - h[2]) ** 2)
        shell = (dist >= r + 1.5) & (dist <= r + 9.0 * s) & ((u - h[0]) < 0.35 * (z - h[2]) + 4.0 + 0.5 * r)
        if shell.any():
            label_id = iid if z > h[2] - 4.0 * zs else 0
            _put_bone(tis, lab, shell, (dist >= r + 3.0) & (dist <= r + 7.0 * s), label_id, _CANCELLOUS)


def _draw_axial_bones(
    tis: np.ndarray, lab: np.ndarray, xb: np.ndarray, yb: np.ndarray, u_side: tuple[np.ndarray, np.ndarray], z: float, subj: _Subject
) -> None:
    s, zs = subj.s, subj.zs
    row = _interp_rows(z, anat.SACRUM, zs)
    if row is not None:
        cy, a, b = row[0] * s, row[1] * s, row[2] * s
        e = (xb / a) ** 2 + ((yb - cy) / b) ** 2
        outer = e <= 1.0
        if z > -40.0 * zs:  # spinous process / median sacral crest
            outer |= (xb / (5.0 * s)) ** 2 + ((yb - cy - b - 14.0 * s) / (16.0 * s)) ** 2 <= 1.0
        inner = (xb / max(a - 2.0, 1.0)) ** 2 + ((yb - cy) / max(b - 2.0, 1.0)) ** 2 <= 1.0
        _put_bone(tis, lab, outer, inner, 0, _CANCELLOUS)
    for p0, p1, radius in anat.RAMI:
        a = np.array([p0[0] * s, p0[1] * s, p0[2] * zs])
        b = np.array([p1[0] * s, p1[1] * s, p1[2] * zs])
        rr = radius * s
        if min(a[2], b[2]) - rr <= z <= max(a[2], b[2]) + rr:
            for u in u_side:
                d = _seg_dist(u, yb, z, a, b)
                outer = d <= rr
                if outer.any():
                    _put_bone(tis, lab, outer, d <= rr - 2.0, 0, _CANCELLOUS)


# --------------------------------------------------------------------------- atrophy, metal, HU


def _apply_atrophy(
    params: PhantomParams, tissue: np.ndarray, labels: np.ndarray, left_cols: np.ndarray, table: LabelTable, spacing: tuple[float, float, float]
) -> None:
    """Shrink each atrophied muscle toward its core until the requested fraction remains."""
    requests: dict[tuple[str, str], float] = {}
    for key, frac in params.atrophy.items():
        name, _, side = str(key).partition(":")
        table.by_key(name)  # raises LabelTableError for an unknown key
        for sd in (side,) if side else SIDES:
            requests[(name, sd)] = float(frac)
    for (name, side), frac in sorted(requests.items()):
        if frac >= 1.0:
            continue
        lid = table.by_key(name).id
        cols = left_cols if side == "left" else ~left_cols
        mask = np.zeros(labels.shape, dtype=bool)
        mask[:, :, cols] = labels[:, :, cols] == lid
        count = int(mask.sum())
        if count == 0:
            continue
        sl = ndimage.find_objects(mask.astype(np.uint8))[0]
        sl = tuple(slice(max(x.start - 1, 0), x.stop + 1) for x in sl)
        sub = mask[sl]
        depth = ndimage.distance_transform_edt(sub, sampling=spacing)
        flat = np.flatnonzero(sub)
        order = np.argsort(-depth.ravel()[flat], kind="stable")
        n_keep = int(round(frac * count))
        drop = flat[order[n_keep:]]
        sub_lab = labels[sl]
        sub_tis = tissue[sl]
        ri = np.unravel_index(drop, sub.shape)
        sub_lab[ri] = 0
        sub_tis[ri] = _FAT


def _implant_mask(params: PhantomParams, subj: _Subject, grid: _Grid) -> np.ndarray:
    """Total hip prosthesis: femoral head, neck and stem plus the acetabular cup."""
    f = _Femur(subj)
    n_k, n_r, n_c = len(grid.z), len(grid.y), len(grid.x)
    mask = np.zeros((n_k, n_r, n_c), dtype=bool)
    X, Y = np.meshgrid(grid.x, grid.y)
    cr, sr = math.cos(subj.rot_rad), math.sin(subj.rot_rad)
    xb = cr * (X - subj.midline_x_mm) + sr * (Y - subj.center_y_mm)
    yb = -sr * (X - subj.midline_x_mm) + cr * (Y - subj.center_y_mm)
    u = xb if params.implant == "left" else -xb
    stem_end_z = -250.0 * subj.zs
    au, ay = f.axis(stem_end_z)
    stem_end = np.array([float(au), float(ay), stem_end_z])
    stem_top = np.array([*(float(v) for v in f.axis(f.neck_base[2])), f.neck_base[2]])
    h, r = f.head, f.head_r
    for k, z in enumerate(grid.z):
        z = float(z)
        if z > h[2] + r + 6.0 or z < stem_end_z - 8.0:
            continue
        m = np.zeros((n_r, n_c), dtype=bool)
        dist = np.sqrt((u - h[0]) ** 2 + (y_ := yb - h[1]) ** 2 + (z - h[2]) ** 2)
        m |= dist <= r - 2.0  # head
        m |= (dist >= r + 0.5) & (dist <= r + 4.0) & ((u - h[0]) < 0.2 * r)  # cup
        m |= _seg_dist(u, yb, z, h, f.neck_base) <= 8.0
        d_stem = _seg_dist(u, yb, z, stem_top, stem_end)
        t = float(np.clip((stem_top[2] - z) / (stem_top[2] - stem_end_z), 0, 1))
        m |= d_stem <= 9.0 - 4.0 * t
        del y_
        mask[k] = m
    return mask


def _metal_neighbours(metal: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], table: LabelTable) -> tuple[str, ...]:
    if not metal.any():
        return ()
    margin = [int(math.ceil(METAL_NEAR_MM / s)) + 1 for s in spacing]
    sl = ndimage.find_objects(metal.astype(np.uint8))[0]
    sl = tuple(slice(max(x.start - m, 0), x.stop + m) for x, m in zip(sl, margin))
    dist = ndimage.distance_transform_edt(~metal[sl], sampling=spacing)
    near = labels[sl][(dist <= METAL_NEAR_MM) & ~metal[sl]]
    ids = sorted(int(i) for i in np.unique(near) if i > 0)
    return tuple(table.by_id(i).key for i in ids)


def _random_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    f = rng.standard_normal(shape, dtype=np.float32)
    if sigma > 0:
        f = ndimage.gaussian_filter(f, sigma=sigma, mode="nearest")
    std = float(f.std())
    return f / std if std > 0 else f


def _render_hu(
    params: PhantomParams, subj: _Subject, tissue: np.ndarray, labels: np.ndarray, table: LabelTable, rng: np.random.Generator
) -> np.ndarray:
    hu = _TISSUE_HU[tissue]
    offsets = np.zeros(256, dtype=np.float32)
    for key, off in subj.muscle_hu.items():
        if key in table.keys():
            offsets[table.by_key(key).id] = off
    muscle = (tissue == _MUSCLE) | (tissue == _SEPTUM)
    hu[muscle] += offsets[labels[muscle]]
    texture = _random_field(rng, tissue.shape, 1.0)
    # intramuscular fat: a speckle whose share grows with fat_fraction
    share = float(np.clip(0.04 + 0.3 * (params.fat_fraction - 0.1), 0.02, 0.2))
    speck = (tissue == _MUSCLE) & (texture > float(np.quantile(texture[::4, ::4, ::4], 1.0 - share)))
    hu[speck] = 0.35 * hu[speck] + 0.65 * _TISSUE_HU[_FAT]
    bone = (tissue == _CORTEX) | (tissue == _CANCELLOUS)
    hu[bone] += 90.0 * texture[bone]
    vis = tissue == _VISCERA
    hu[vis] += 30.0 * texture[vis]
    gas = vis & (np.roll(texture, 3, axis=2) > 2.3)
    hu[gas] = -850.0
    fat = tissue == _FAT
    hu[fat] += 8.0 * texture[fat]
    # partial volume
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.45, 0.45), mode="nearest")
    if params.noise_hu > 0:
        hu += params.noise_hu * _random_field(rng, tissue.shape, 0.6)
    return hu


def _add_streaks(hu: np.ndarray, metal: np.ndarray, grid: _Grid, rng: np.random.Generator) -> None:
    """Bright/dark radial streaks through the metal of each slice that contains it."""
    angles = rng.uniform(0, np.pi, size=14)
    amps = rng.uniform(250, 700, size=14) * np.where(np.arange(14) % 2 == 0, 1.0, -1.0)
    X, Y = np.meshgrid(grid.x, grid.y)
    dz, dy, dx = grid.spacing_mm
    for k in np.flatnonzero(metal.any(axis=(1, 2))):
        rr, cc = np.nonzero(metal[k])
        cx, cy = float(grid.x[cc].mean()), float(grid.y[rr].mean())
        strength = min(1.0, math.sqrt(rr.size * dx * dy / 400.0))
        phi = np.arctan2(Y - cy, X - cx)
        rho = np.hypot(X - cx, Y - cy)
        streak = np.zeros_like(rho)
        for ang, amp in zip(angles, amps):
            perp = np.abs(rho * np.sin(phi - ang))
            streak += amp * np.exp(-(perp**2) / (2 * 2.5**2)) * np.exp(-rho / 140.0)
        hu[k] += (strength * streak).astype(np.float32)
    hu[metal] = np.maximum(hu[metal], 3000.0)


def generate_phantom(params: PhantomParams, labels: LabelTable | None = None) -> Phantom:
    """Build one synthetic subject (deterministic in ``params``)."""
    t0 = time.perf_counter()
    table = labels if labels is not None else load_label_table()
    rng_subject = np.random.default_rng(np.random.SeedSequence(params.seed).spawn(1)[0])
    scan_seed = params.seed if params.scan_seed is None else params.scan_seed
    rng_texture, rng_metal = (np.random.default_rng(s) for s in np.random.SeedSequence([scan_seed, 7]).spawn(2))
    subj = _draw_subject(params, rng_subject)
    grid = _make_grid(params, subj)
    tissue, label_map = _build_slices(params, subj, grid, table)
    affine = grid.affine_lps
    left_cols = _left_columns(affine, len(grid.x), subj.midline_x_mm)
    _apply_atrophy(params, tissue, label_map, left_cols, table, grid.spacing_mm)
    metal = np.zeros(tissue.shape, dtype=bool)
    metal_near: tuple[str, ...] = ()
    if params.implant is not None:
        metal = _implant_mask(params, subj, grid) & (tissue != _AIR)
        tissue[metal] = _METAL
        label_map[metal] = 0
        metal_near = _metal_neighbours(metal, label_map, grid.spacing_mm, table)
    hu = _render_hu(params, subj, tissue, label_map, table, rng_texture)
    if metal.any():
        _add_streaks(hu, metal, grid, rng_metal)
    hu[tissue == _AIR] = np.minimum(hu[tissue == _AIR], -900.0) if params.implant else hu[tissue == _AIR]
    np.clip(hu, -1024.0, 8000.0, out=hu)
    phantom = Phantom(
        hu=hu.astype(np.float32),
        labels=label_map,
        affine_lps=affine,
        params=params,
        midline_x_mm=subj.midline_x_mm,
        metal_structures=metal_near,
    )
    logger.info(
        "phantom seed=%d shape=%s spacing=%s in %.2f s", params.seed, hu.shape, grid.spacing_mm, time.perf_counter() - t0
    )
    return phantom


# --------------------------------------------------------------------------- writers

NIFTI_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "thighnode-phantom"


def phantom_uid(*parts: object) -> str:
    """Deterministic UID (2.25 form, PS3.5 B.2) from the given parts."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=[_UID_ROOT, *(str(p) for p in parts)]))


def write_nifti_pair(phantom: Phantom, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>_ct.nii.gz`` (int16 HU) and ``<name>_label.nii.gz`` (uint8).

    The arrays are stored as they are, axis order ``(k, r, c)``; the NIfTI affine is
    ``NIFTI_LPS_TO_RAS @ affine_lps`` (RAS, mm; sform and qform code 1). A loader gets
    the LPS affine back with ``NIFTI_LPS_TO_RAS @ img.affine`` (the matrix is its own
    inverse) and keeps the array as it is.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine_ras = NIFTI_LPS_TO_RAS @ phantom.affine_lps
    hu = np.clip(np.rint(phantom.hu), -1024, 32767).astype(np.int16)
    paths = (out_dir / f"{name}_ct.nii.gz", out_dir / f"{name}_label.nii.gz")
    for arr, path in ((hu, paths[0]), (np.asarray(phantom.labels, dtype=np.uint8), paths[1])):
        img = nib.Nifti1Image(arr, affine_ras)
        img.header.set_xyzt_units("mm")
        img.set_sform(affine_ras, code=1)
        img.set_qform(affine_ras, code=1)
        nib.save(img, str(path))
    return paths


def write_ground_truth(phantom: Phantom, path: Path, labels: LabelTable | None = None) -> None:
    """Write ``ground_truth(phantom, labels)`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ground_truth(phantom, labels), indent=1), encoding="utf-8")


def _resample_inplane(phantom: Phantom, pixel_spacing_mm: float | None, matrix: int | None) -> tuple[np.ndarray, np.ndarray]:
    """HU and LPS affine resampled in-plane over the same field of view."""
    hu, affine = np.asarray(phantom.hu), np.asarray(phantom.affine_lps, dtype=float)
    if pixel_spacing_mm is None and matrix is None:
        return hu, affine
    _, dy, dx = phantom.spacing_mm
    fov_r, fov_c = hu.shape[1] * dy, hu.shape[2] * dx
    if matrix is not None:
        n_r = n_c = int(matrix)
        new_dy, new_dx = fov_r / n_r, fov_c / n_c
    else:
        assert pixel_spacing_mm is not None
        n_r, n_c = int(round(fov_r / pixel_spacing_mm)), int(round(fov_c / pixel_spacing_mm))
        new_dy, new_dx = fov_r / n_r, fov_c / n_c
    out = ndimage.zoom(hu, (1.0, n_r / hu.shape[1], n_c / hu.shape[2]), order=1, mode="nearest", grid_mode=True)
    new = affine.copy()
    new[:3, 1] = affine[:3, 1] / dy * new_dy
    new[:3, 2] = affine[:3, 2] / dx * new_dx
    # first voxel centre: the old first edge plus half a new pixel
    new[:3, 3] = affine[:3, 3] - 0.5 * affine[:3, 1] - 0.5 * affine[:3, 2] + 0.5 * new[:3, 1] + 0.5 * new[:3, 2]
    return out.astype(np.float32), new


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    patient_sex: str | None = None,
    birth_date: str = "19600101",
    height_m: float | None = None,
    weight_kg: float | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "20240101",
    study_time: str = "090000",
    accession: str = "",
    study_id: str = "1",
    study_description: str = "CT thighs",
    series_number: int = 2,
    series_description: str = "Thigh CT soft tissue (phantom)",
    kernel: str = "STANDARD",
    kvp: float = 120.0,
    transfer_syntax: str | None = None,
    pixel_spacing_mm: float | None = None,
    matrix: int | None = None,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series (PS3.3 A.3), one file per slice.

    Modules: Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2,
    PatientSize/PatientWeight), General Series (C.7.3.1), Frame of Reference (C.7.4.1),
    General Equipment (C.7.5.1), General Image (C.7.6.1), Image Plane (C.7.6.2), Image
    Pixel (C.7.6.3), CT Image (C.8.2.1), VOI LUT (C.11.2), SOP Common (C.12.1).
    Pixel values: unsigned 16 bit, HU = stored - 1024. Files are named
    ``<SOPInstanceUID>.dcm``; InstanceNumber 1 is the most superior slice. UIDs not
    given are derived from the seed. ``pixel_spacing_mm`` or ``matrix`` resample the
    slices in-plane (same field of view). ``transfer_syntax``: Explicit VR Little
    Endian (default), Implicit VR Little Endian or RLE Lossless.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless

    params = phantom.params
    ts = transfer_syntax or ExplicitVRLittleEndian
    allowed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
    if ts not in allowed:
        raise PhantomError(f"write_dicom_series: transfer_syntax {ts!r} is not supported; allowed: {allowed}")
    sex = patient_sex if patient_sex is not None else params.sex
    if sex not in ("F", "M", "O", ""):
        raise PhantomError(f"write_dicom_series: patient_sex {sex!r}; allowed: F, M, O or empty")
    pid = patient_id if patient_id is not None else f"PHANTOM{params.seed:06d}"
    pname = patient_name if patient_name is not None else f"Phantom^Subject{params.seed}"
    height = float(height_m if height_m is not None else params.height_m)
    weight = float(weight_kg if weight_kg is not None else round(22.0 * params.size**2 * height**2 * (1 + params.fat_fraction - 0.25), 1))
    study_uid = study_uid or phantom_uid("study", params.seed, params.scan_seed)
    series_uid = series_uid or phantom_uid("series", params.seed, params.scan_seed, series_number)
    for_uid = frame_of_reference_uid or phantom_uid("for", params.seed, params.scan_seed)

    hu, affine = _resample_inplane(phantom, pixel_spacing_mm, matrix)
    dz = float(np.linalg.norm(affine[:3, 0]))
    dy = float(np.linalg.norm(affine[:3, 1]))
    dx = float(np.linalg.norm(affine[:3, 2]))
    row_dir = affine[:3, 2] / dx
    col_dir = affine[:3, 1] / dy
    stored = np.clip(np.rint(hu) + 1024.0, 0, 65535).astype(np.uint16)
    n_k = hu.shape[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n_k):
        instance = n_k - k
        sop_uid = phantom_uid("sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == RLELossless else ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.AcquisitionDate = study_date
        ds.ContentDate = study_date
        ds.StudyTime = study_time
        ds.SeriesTime = study_time
        ds.AcquisitionTime = study_time
        ds.ContentTime = study_time
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "thighnode phantom"
        ds.InstitutionName = "thighnode"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "pipeline.phantom"
        ds.PatientName = pname
        ds.PatientID = pid
        ds.PatientBirthDate = birth_date
        ds.PatientSex = sex
        ds.PatientSize = f"{height:.2f}"
        ds.PatientWeight = f"{weight:.1f}"
        ds.BodyPartExamined = "LEG"
        ds.ImageLaterality = "B"  # both legs (satisfies the Laterality 2C condition)
        ds.SliceThickness = f"{dz:.3f}".rstrip("0").rstrip(".")
        ds.KVP = f"{kvp:g}"
        ds.SoftwareVersions = "thighnode-phantom-1"
        ds.ConvolutionKernel = kernel
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study_id
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        pos = affine @ np.array([k, 0.0, 0.0, 1.0])
        ds.ImagePositionPatient = [_ds_str(v) for v in pos[:3]]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_str(pos[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(hu.shape[1])
        ds.Columns = int(hu.shape[2])
        ds.PixelSpacing = [_ds_str(dy), _ds_str(dx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = "50"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        if ts == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        path = out_dir / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=(ts == ImplicitVRLittleEndian), little_endian=True)
        paths.append(path)
    logger.info("wrote DICOM series: %d instances, %dx%d", n_k, hu.shape[1], hu.shape[2])
    return paths


def _ds_str(value: float) -> str:
    """A DS value (max 16 characters)."""
    v = float(value)
    if abs(v) < 1e-9:
        v = 0.0
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{v:.8g}"


# --------------------------------------------------------------------------- datasets

FOLLOW_UP_MUSCLES = (
    "vastus_lateralis",
    "vastus_medialis",
    "vastus_intermedius",
    "rectus_femoris",
    "gluteus_medius",
    "gluteus_maximus",
    "adductor_magnus",
    "biceps_femoris",
    "semimembranosus",
    "sartorius",
)


@dataclass(frozen=True)
class DatasetEntry:
    """One written study of a dataset (a row of ``dataset.json``)."""

    name: str
    directory: Path
    ct_path: Path | None
    label_path: Path | None
    truth_path: Path
    dicom_dir: Path | None
    patient_id: str
    study_uid: str
    role: str  # "baseline" or "follow_up"
    baseline: str  # name of the baseline study (itself for a baseline)


def subject_params(
    index: int,
    seed: int,
    *,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    variation: bool = True,
    implant_fraction: float = 0.0,
    cut_fov_fraction: float = 0.0,
) -> PhantomParams:
    """The parameters of subject ``index`` of a dataset drawn from ``seed``."""
    rng = np.random.default_rng([seed, index, 11])
    subject_seed = int(rng.integers(0, 2**31 - 1))
    if not variation:
        return PhantomParams(seed=subject_seed, spacing_mm=spacing_mm)
    sex = "F" if rng.random() < 0.5 else "M"
    height = float(rng.normal(1.64, 0.06) if sex == "F" else rng.normal(1.77, 0.07))
    fat = float(rng.uniform(0.18, 0.42) if sex == "F" else rng.uniform(0.1, 0.3))
    implant = None
    if rng.random() < implant_fraction:
        implant = "left" if rng.random() < 0.5 else "right"
    top = bottom = None
    if rng.random() < cut_fov_fraction:
        if rng.random() < 0.5:
            top = float(rng.uniform(-90.0, -30.0))
        else:
            bottom = float(rng.uniform(-420.0, -300.0))
    return PhantomParams(
        seed=subject_seed,
        sex=sex,
        height_m=float(np.clip(height, 1.45, 2.0)),
        size=float(np.clip(rng.normal(1.0, 0.1), 0.82, 1.22)),
        fat_fraction=fat,
        implant=implant,
        fov_top_mm=top,
        fov_bottom_mm=bottom,
        spacing_mm=spacing_mm,
        noise_hu=float(rng.uniform(8.0, 20.0)),
    )


def follow_up_atrophy(params: PhantomParams, index: int) -> dict[str, float]:
    """Known right-side atrophy of a follow-up: 3..5 muscles, each losing 5..25 %."""
    rng = np.random.default_rng([params.seed, index, 23])
    n = int(rng.integers(3, 6))
    keys = rng.choice(len(FOLLOW_UP_MUSCLES), size=n, replace=False)
    return {f"{FOLLOW_UP_MUSCLES[i]}:right": round(float(rng.uniform(0.75, 0.95)), 3) for i in sorted(keys)}


def generate_dataset(
    out_dir: Path,
    *,
    n_subjects: int,
    seed: int,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    nifti: bool = True,
    dicom: bool = False,
    follow_up: bool = False,
    variation: bool = True,
    implant_fraction: float = 0.0,
    cut_fov_fraction: float = 0.0,
    labels: LabelTable | None = None,
) -> list[Path]:
    """Write ``n_subjects`` phantoms under ``out_dir`` and return their study directories.

    Each study goes to ``out_dir/<name>/``: ``<name>_ct.nii.gz`` + ``<name>_label.nii.gz``
    (when ``nifti``), ``<name>_truth.json`` (always) and ``dicom/`` (when ``dicom``).
    Names are ``subject_000``...; with ``follow_up`` every subject also gets
    ``subject_000_fu``: the same patient (PatientID, anatomy) scanned again a year later
    with known right-side atrophy (see the truth's ``params.atrophy``). ``dataset.json``
    in ``out_dir`` lists every study (:class:`DatasetEntry` fields). Returned: the study
    directories in order (baseline, then its follow-up).
    """
    if n_subjects < 1:
        raise PhantomError(f"generate_dataset: n_subjects is {n_subjects}; allowed: >= 1")
    table = labels if labels is not None else load_label_table()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[DatasetEntry] = []
    for i in range(n_subjects):
        base = subject_params(
            i, seed, spacing_mm=spacing_mm, variation=variation,
            implant_fraction=implant_fraction, cut_fov_fraction=cut_fov_fraction,
        )
        name = f"subject_{i:03d}"
        patient_id = f"PH{seed % 100000:05d}{i:04d}"
        studies = [(name, base, "baseline", "20230110")]
        if follow_up:
            fu = PhantomParams(**{**base.to_record(), "spacing_mm": base.spacing_mm,
                                  "atrophy": follow_up_atrophy(base, i), "scan_seed": base.seed + 1_000_003})
            studies.append((f"{name}_fu", fu, "follow_up", "20240115"))
        for study_name, params, role, date in studies:
            phantom = generate_phantom(params, table)
            sdir = out_dir / study_name
            sdir.mkdir(parents=True, exist_ok=True)
            ct = lab = None
            if nifti:
                ct, lab = write_nifti_pair(phantom, sdir, study_name)
            truth = sdir / f"{study_name}_truth.json"
            write_ground_truth(phantom, truth, table)
            study_uid = phantom_uid("dataset", seed, i, role)
            dicom_dir = None
            if dicom:
                dicom_dir = sdir / "dicom"
                write_dicom_series(
                    phantom, dicom_dir, patient_id=patient_id, patient_name=f"Phantom^{name}",
                    birth_date="19580612", study_uid=study_uid,
                    series_uid=phantom_uid("dataset-series", seed, i, role),
                    frame_of_reference_uid=phantom_uid("dataset-for", seed, i, role),
                    study_date=date, accession=f"A{seed % 1000:03d}{i:04d}{'F' if role == 'follow_up' else 'B'}",
                )
            entries.append(DatasetEntry(study_name, sdir, ct, lab, truth, dicom_dir, patient_id, study_uid, role, name))
    index = [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(e).items()} for e in entries
    ]
    (out_dir / "dataset.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return [e.directory for e in entries]
