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

The public surface is here: :class:`PhantomParams`, :class:`Phantom`, :func:`ground_truth`
(:mod:`modelkit.phantom_types`), :func:`generate_phantom`, and the writers of
:mod:`modelkit.phantom_io`; data sets of many subjects: :mod:`modelkit.phantom_dataset`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from modelkit import phantom_anatomy as anat
from modelkit.phantom_artifacts import add_metal_artifacts
from modelkit.phantom_implants import implant_masks
from modelkit.phantom_io import (
    NIFTI_LPS_TO_RAS,
    phantom_uid,
    write_dicom_series,
    write_ground_truth,
    write_nifti_pair,
)
from modelkit.phantom_shapes import (
    AIR,
    CANCELLOUS,
    CORTEX,
    FAT,
    METAL,
    MUSCLE,
    SEPTUM,
    SKIN,
    TABLE,
    VISCERA,
    Femur,
    Subject,
    draw_axial_bones,
    draw_femur,
    draw_ilium,
    draw_subject,
    interp_rows,
    muscle_tracks,
    smoothstep,
)
from modelkit.phantom_types import (
    IMPLANT_KINDS,
    IMPLANT_SIDES,
    SEXES,
    SIDES,
    Phantom,
    PhantomError,
    PhantomParams,
    ground_truth,
    left_columns,
)
from pipeline.labels import LabelTable, load_label_table

__all__ = [
    "IMPLANT_KINDS", "IMPLANT_SIDES", "NIFTI_LPS_TO_RAS", "SEXES", "SIDES", "Phantom", "PhantomError", "PhantomParams", "generate_phantom",
    "ground_truth", "phantom_uid", "write_dicom_series", "write_ground_truth", "write_nifti_pair",
]

logger = logging.getLogger(__name__)

# HU of each tissue class of modelkit.phantom_shapes (AIR .. TABLE), before texture, noise and blur.
_TISSUE_HU = np.array([-1000.0, -98.0, 25.0, 48.0, -45.0, 1450.0, 260.0, 45.0, 28.0, 3500.0, -350.0], dtype=np.float32)

_LABEL_FEMUR = "femur"
_LABEL_ILIUM = "ilium"
METAL_NEAR_MM = 20.0


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


def _make_grid(params: PhantomParams, subj: Subject) -> _Grid:
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
    fill = float(smoothstep((-150.0 * zs - z) / (80.0 * zs)))
    knee = float(smoothstep((z - (-500.0 * zs)) / (60.0 * zs)))
    return 1.0 + 1.8 * fill * (0.3 + 0.7 * knee)


def _envelope(
    z: float, subj: Subject, femur: Femur, xb: np.ndarray, yb: np.ndarray, u_side: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of one slice (r, c): the muscle compartment, the body (skin included) and the body inside the skin."""
    zs, s = subj.zs, subj.s
    n_r, n_c = xb.shape
    t_fat = subj.fat_mm * (0.8 + 0.4 * float(smoothstep((z - anat.KNEE_Z_MM * zs) / (500.0 * zs))))
    comp = np.zeros((n_r, n_c), dtype=bool)
    body = np.zeros((n_r, n_c), dtype=bool)
    inner_skin = np.zeros((n_r, n_c), dtype=bool)
    row = interp_rows(z, anat.BODY_OUTLINE, zs)
    if row is not None:
        a_b, b_b, yc = (row[0] - 20.0) * s, (row[1] - 20.0) * s, row[2] * s
        comp |= (xb / a_b) ** 2 + ((yb - yc) / b_b) ** 2 <= 1.0
        body |= (xb / (a_b + t_fat)) ** 2 + ((yb - yc) / (b_b + t_fat)) ** 2 <= 1.0
        inner_skin |= (xb / (a_b + t_fat - 2.0)) ** 2 + ((yb - yc) / (b_b + t_fat - 2.0)) ** 2 <= 1.0
    leg = interp_rows(z, anat.LEG_OUTLINE, zs)
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
    return comp, body, inner_skin


def _draw_muscles(
    tis: np.ndarray, lab: np.ndarray, comp: np.ndarray, k: int, thr: float, tracks: dict, muscle_label: np.ndarray,
    yb: np.ndarray, u_side: tuple[np.ndarray, np.ndarray],
) -> None:
    """Each compartment voxel of slice ``k`` goes to the muscle with the smallest ellipse-normalised
    distance, if that is below ``thr``."""
    muscle_keys = [key for key, _ in anat.MUSCLES]
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
        tis[rr, cc] = MUSCLE
        lab[rr, cc] = muscle_label[best_m[is_m]]


def _draw_septa(tis: np.ndarray, lab: np.ndarray) -> None:
    """One-voxel septa between different muscles of a slice (tissue SEPTUM, label kept)."""
    muscle = tis == MUSCLE
    edge = np.zeros_like(muscle)
    diff_c = (lab[:, 1:] != lab[:, :-1]) & muscle[:, 1:] & muscle[:, :-1]
    diff_r = (lab[1:, :] != lab[:-1, :]) & muscle[1:, :] & muscle[:-1, :]
    edge[:, 1:] |= diff_c
    edge[1:, :] |= diff_r
    tis[edge] = SEPTUM


def _build_slices(
    params: PhantomParams, subj: Subject, grid: _Grid, table: LabelTable
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue class and label per voxel."""
    n_k, n_r, n_c = len(grid.z), len(grid.y), len(grid.x)
    tissue = np.zeros((n_k, n_r, n_c), dtype=np.uint8)
    labels = np.zeros((n_k, n_r, n_c), dtype=np.uint8)
    femur = Femur(subj)
    tracks = muscle_tracks(grid.z, subj, femur)
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
        comp, body, inner_skin = _envelope(z, subj, femur, xb, yb, u_side)
        tis = np.full((n_r, n_c), AIR, dtype=np.uint8)
        lab = np.zeros((n_r, n_c), dtype=np.uint8)
        tis[body] = SKIN
        tis[inner_skin & body] = FAT
        tis[np.ix_(table_rows, table_cols)] = np.where(body[np.ix_(table_rows, table_cols)], FAT, TABLE)

        # pelvic cavity (viscera)
        cav = interp_rows(z, anat.PELVIC_CAVITY, zs)
        if cav is not None:
            cy, ca, cb = cav[0] * s, cav[1] * s, cav[2] * s
            tis[comp & ((xb / ca) ** 2 + ((yb - cy) / cb) ** 2 <= 1.0)] = VISCERA

        _draw_muscles(tis, lab, comp, k, _muscle_threshold(z, zs), tracks, muscle_label, yb, u_side)

        # bones (override soft tissue)
        for u in u_side:
            draw_femur(tis, lab, u, yb, z, femur, femur_id)
            draw_ilium(tis, lab, u, yb, z, femur, subj, ilium_id)
        draw_axial_bones(tis, lab, xb, yb, u_side, z, subj)

        _draw_septa(tis, lab)
        tissue[k] = tis
        labels[k] = lab
    return tissue, labels


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
        sub_tis[ri] = FAT


def _body_coords(subj: Subject, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame x (toward the patient's left) and y (posterior) of each voxel of a slice (r, c), mm."""
    X, Y = np.meshgrid(grid.x, grid.y)
    cr, sr = math.cos(subj.rot_rad), math.sin(subj.rot_rad)
    xb = cr * (X - subj.midline_x_mm) + sr * (Y - subj.center_y_mm)
    yb = -sr * (X - subj.midline_x_mm) + cr * (Y - subj.center_y_mm)
    return xb, yb


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
    params: PhantomParams, subj: Subject, tissue: np.ndarray, labels: np.ndarray, table: LabelTable, rng: np.random.Generator
) -> np.ndarray:
    hu = _TISSUE_HU[tissue]
    offsets = np.zeros(256, dtype=np.float32)
    for key, off in subj.muscle_hu.items():
        if key in table.keys():
            offsets[table.by_key(key).id] = off
    muscle = (tissue == MUSCLE) | (tissue == SEPTUM)
    hu[muscle] += offsets[labels[muscle]]
    texture = _random_field(rng, tissue.shape, 1.0)
    # intramuscular fat: a speckle whose share grows with fat_fraction
    share = float(np.clip(0.04 + 0.3 * (params.fat_fraction - 0.1), 0.02, 0.2))
    speck = (tissue == MUSCLE) & (texture > float(np.quantile(texture[::4, ::4, ::4], 1.0 - share)))
    hu[speck] = 0.35 * hu[speck] + 0.65 * _TISSUE_HU[FAT]
    bone = (tissue == CORTEX) | (tissue == CANCELLOUS)
    hu[bone] += 90.0 * texture[bone]
    vis = tissue == VISCERA
    hu[vis] += 30.0 * texture[vis]
    gas = vis & (np.roll(texture, 3, axis=2) > 2.3)
    hu[gas] = -850.0
    fat = tissue == FAT
    hu[fat] += 8.0 * texture[fat]
    # partial volume
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.45, 0.45), mode="nearest")
    if params.noise_hu > 0:
        hu += params.noise_hu * _random_field(rng, tissue.shape, 0.6)
    return hu


def generate_phantom(params: PhantomParams, labels: LabelTable | None = None) -> Phantom:
    """Build one synthetic subject (deterministic in ``params``)."""
    t0 = time.perf_counter()
    table = labels if labels is not None else load_label_table()
    rng_subject = np.random.default_rng(np.random.SeedSequence(params.seed).spawn(1)[0])
    scan_seed = params.seed if params.scan_seed is None else params.scan_seed
    rng_texture, rng_metal = (np.random.default_rng(s) for s in np.random.SeedSequence([scan_seed, 7]).spawn(2))
    subj = draw_subject(params, rng_subject)
    grid = _make_grid(params, subj)
    tissue, label_map = _build_slices(params, subj, grid, table)
    affine = grid.affine_lps
    left_cols = left_columns(affine, len(grid.x), subj.midline_x_mm)
    _apply_atrophy(params, tissue, label_map, left_cols, table, grid.spacing_mm)
    metal = np.zeros(tissue.shape, dtype=bool)
    metal_near: tuple[str, ...] = ()
    if params.implant is not None:
        xb, yb = _body_coords(subj, grid)
        metal, plastic = implant_masks(params, subj, grid.z, xb, yb)
        metal &= tissue != AIR
        plastic &= tissue != AIR
        tissue[plastic] = FAT  # polyethylene of a bipolar head (about -100 HU)
        label_map[plastic] = 0
        tissue[metal] = METAL
        label_map[metal] = 0
        metal_near = _metal_neighbours(metal, label_map, grid.spacing_mm, table)
    hu = _render_hu(params, subj, tissue, label_map, table, rng_texture)
    if metal.any():
        add_metal_artifacts(hu, metal, _body_coords(subj, grid)[0] > 0, grid.x, grid.y, grid.spacing_mm, rng_metal)
    hu[tissue == AIR] = np.minimum(hu[tissue == AIR], -900.0) if params.implant else hu[tissue == AIR]
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
