"""Muscle measurements of a segmented thigh CT: volume, HU, mass, fat fraction, SMI, flags.

Per structure of the label table and per side ("right", "left" from
``Segmentation.side_map``; "both" = every voxel of the label, including voxels with
side 0) this stage reports voxel count, volume, mean and standard deviation of HU,
mass and fat fraction; per muscle group (gluteal, above_knee, all) the totals,
volume / height² (cm³/m², as in the hip-fracture UNETR volume paper) and the skeletal
muscle index SMI = mass (kg) / height² (m²) (as in the CT SMI paper, which compares
it with the AWGS 2014 thresholds 5.4 kg/m² for women and 7.0 kg/m² for men). A group is
reported only when the field of view covers its muscles, else withheld with the reason, and
the sarcopenia screen follows its group (:mod:`pipeline.groups`).

Volume
    voxel_count x voxel volume, the voxel volume being |det| of the affine's 3x3 part
    (mm³ -> ml = cm³).

Mass (:data:`DENSITY_FORMULA`)
    Voxel-wise physical density from the CT number, ρ = 1.0 + HU/1000 g/cm³, and
    mass = Σ ρ·V_voxel = V_voxel·(N + ΣHU/1000). The Hounsfield scale is defined
    relative to water (0 HU) and air (-1000 HU); for soft tissues, whose attenuation at
    CT energies is dominated by Compton scattering and thus proportional to electron
    density, this linear map gives physical density to within a few per cent
    (Mull RT, "Mass estimates by computed tomography: physical density from CT numbers",
    AJR 1984;143:1101-1104). Muscle at ~50 HU -> 1.05 g/cm³ (literature 1.06), fat at
    -100 HU -> 0.90 g/cm³ (literature 0.90-0.92). It does NOT hold for bone (cortex at
    1500 HU would give 2.5 g/cm³, true ~1.9): bone labels get a mass by the same formula
    for completeness only. Metal-affected voxels give meaningless masses (flagged).

Fat fraction
    Share of the structure's voxels whose HU lies in the adipose window
    (settings, default -190..-30 HU).

Quality flags (``QualityFlag`` in ``Measurements.flags`` and the code in the
``StructureMeasurement.flags`` of the structure/side they concern):

* ``FLAG_PARTIAL_TOP`` / ``FLAG_PARTIAL_BOTTOM``: the structure touches the superior /
  inferior end of the field of view, so its volume is partial. Superior and inferior
  come from the affine (the array axis most aligned with patient z, and the sign of
  its z step), never from the array order.
* ``FLAG_METAL``: voxels above the metal threshold (connected pieces of at least
  ``metal_min_volume_ml``) lie within ``metal_proximity_mm`` of the structure on that
  side; the message names the side of the implant. ``near_metal_voxels`` counts those
  voxels (pipeline.compare withholds a volume change when their share is large).
* ``FLAG_IMPLAUSIBLE_VOLUME``: a structure not cut by the field of view has a volume
  outside its plausible range (config/measurement.toml) scaled by (height/1.70 m)².
* ``FLAG_EMPTY``: the structure has no voxel on that side (where the field of view covers
  the groups' region this is the segmentation's failure; where it does not, the structure
  is absent from the field of view and withholds its groups: :mod:`pipeline.groups`).
* ``FLAG_NO_HEIGHT`` (study): no usable height; height-adjusted values are None.

Everything is vectorised: one ``np.bincount`` over ``label*3 + side`` per statistic,
processed in slabs of slices to bound memory; the metal proximity uses a Euclidean
distance transform on a box around each metal piece only.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np
from scipy import ndimage

from pipeline.groups import (
    CROSSING_INFERIOR,
    CROSSING_SUPERIOR,
    GLUTEAL_MIN_REACH_MM,
    SUPERIOR_LANDMARK,
    GroupThreshold,
    assess_sarcopenia,
    femur_reach_mm,
    measure_groups,
    read_gluteal_min_reach,
)
from pipeline.labels import GROUPS, LabelTable
from pipeline.types import (
    FLAG_EMPTY,
    FLAG_IMPLAUSIBLE_VOLUME,
    FLAG_METAL,
    FLAG_NO_HEIGHT,
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    SIDE_BOTH,
    SIDE_LEFT,
    SIDE_NONE,
    SIDE_RIGHT,
    Measurements,
    PatientInfo,
    QualityFlag,
    Segmentation,
    StructureMeasurement,
    Volume,
)
from pipeline.uncertainty import with_uncertainty

logger = logging.getLogger(__name__)

DEFAULT_MEASUREMENT_PATH = Path(__file__).resolve().parents[1] / "config" / "measurement.toml"

DENSITY_FORMULA = (
    "mass = sum over voxels of rho x V_voxel with rho = 1.0 + HU/1000 g/cm3 "
    "(Hounsfield scale relative to water; physical density of soft tissue from CT number, "
    "Mull RT, AJR 1984;143:1101-1104); not valid for bone or metal"
)

HEIGHT_SOURCE_PATIENT_SIZE = "PatientSize"
HEIGHT_SOURCE_RECORDED = "recorded"
MIN_HEIGHT_M = 0.5
MAX_HEIGHT_M = 2.5
"""Heights outside this range are not used (PatientSize in cm, typos)."""

SIDES: tuple[tuple[str, int], ...] = (("right", SIDE_RIGHT), ("left", SIDE_LEFT))
_N_SIDE_CODES = 3  # SIDE_NONE, SIDE_RIGHT, SIDE_LEFT
_SLAB_VOXELS = 8_000_000  # voxels per bincount slab (bounds the temporaries to ~100 MB)
_MUSCLE_GROUPS = tuple(g for g in GROUPS if g != "bone")


class MeasurementSettingsError(ValueError):
    """config/measurement.toml is missing or invalid (says which key and why)."""


@dataclass(frozen=True)
class MeasurementSettings:
    """How measure() works; defaults and their sources are in config/measurement.toml.

    ``groups``: (group name, label-table groups it sums); ``plausible_typical_ml``:
    (label key, typical one-side volume in cm³ at ``plausible_reference_height_m``);
    the plausible range is typical x [min_factor, max_factor] x (height/reference)².
    """

    fat_min_hu: float = -190.0
    fat_max_hu: float = -30.0
    metal_threshold_hu: float = 2000.0
    metal_proximity_mm: float = 15.0
    metal_min_volume_ml: float = 0.1
    groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        (GROUP_GLUTEAL, ("gluteal",)),
        (GROUP_ABOVE_KNEE, ("anterior", "medial", "posterior", "gluteal")),
        (GROUP_ALL, _MUSCLE_GROUPS),
    )
    sarcopenia_group: str = GROUP_ALL
    threshold_female_kg_m2: float = 5.4
    threshold_male_kg_m2: float = 7.0
    calibrated_for_ct: bool = False
    threshold_source: str = "AWGS 2014 (DXA appendicular lean mass); not calibrated for CT thigh muscle mass"
    plausible_reference_height_m: float = 1.70
    plausible_min_factor: float = 0.25
    plausible_max_factor: float = 3.0
    plausible_typical_ml: tuple[tuple[str, float], ...] = ()
    crossing_inferior: tuple[str, ...] = CROSSING_INFERIOR
    crossing_superior: tuple[str, ...] = CROSSING_SUPERIOR
    superior_landmark: str = SUPERIOR_LANDMARK
    gluteal_min_reach_mm: float = GLUTEAL_MIN_REACH_MM
    group_thresholds: tuple[GroupThreshold, ...] = ()

    def __post_init__(self) -> None:
        if not self.fat_min_hu < self.fat_max_hu:
            raise MeasurementSettingsError(
                f"fat HU window {self.fat_min_hu}..{self.fat_max_hu}: the minimum must be below the maximum"
            )
        for name in ("metal_proximity_mm", "metal_min_volume_ml", "plausible_reference_height_m"):
            if not getattr(self, name) > 0:
                raise MeasurementSettingsError(f"{name} is {getattr(self, name)!r}; allowed: > 0")
        if not 0 < self.plausible_min_factor < 1 < self.plausible_max_factor:
            raise MeasurementSettingsError(
                f"plausible factors {self.plausible_min_factor}..{self.plausible_max_factor}: "
                "allowed: 0 < min_factor < 1 < max_factor"
            )
        names = [name for name, _ in self.groups]
        if len(set(names)) != len(names):
            raise MeasurementSettingsError(f"group names must be unique; saw {names}")
        for name, members in self.groups:
            bad = [m for m in members if m not in _MUSCLE_GROUPS]
            if bad or not members:
                raise MeasurementSettingsError(
                    f"group {name!r} lists {list(members)}; allowed: a non-empty subset of {list(_MUSCLE_GROUPS)}"
                )
        if self.sarcopenia_group not in names:
            raise MeasurementSettingsError(
                f"sarcopenia group {self.sarcopenia_group!r} is not a defined group; defined: {names}"
            )
        for name in ("threshold_female_kg_m2", "threshold_male_kg_m2"):
            if not 0 < getattr(self, name) < 30:
                raise MeasurementSettingsError(f"{name} is {getattr(self, name)!r}; allowed: 0 < value < 30 kg/m²")
        for t in self.group_thresholds:
            if t.group not in names or not (0 < t.threshold_female_kg_m2 < 30 and 0 < t.threshold_male_kg_m2 < 30):
                raise MeasurementSettingsError(
                    f"sarcopenia.group_thresholds.{t.group}: group must be one of {names} and thresholds "
                    f"0 < value < 30 kg/m²; saw {t.threshold_female_kg_m2!r} / {t.threshold_male_kg_m2!r}"
                )
        for key, typical in self.plausible_typical_ml:
            if not typical > 0:
                raise MeasurementSettingsError(f"plausible_volume.typical_ml.{key} is {typical!r}; allowed: > 0 cm³")

    def plausible_range_ml(self, key: str, height_m: float | None) -> tuple[float, float] | None:
        """(min, max) cm³ for one side of ``key``, scaled by (height/reference)²; None if unchecked."""
        typical = dict(self.plausible_typical_ml).get(key)
        if typical is None:
            return None
        scale = (height_m / self.plausible_reference_height_m) ** 2 if height_m else 1.0
        return typical * self.plausible_min_factor * scale, typical * self.plausible_max_factor * scale

    def threshold_kg_m2(self, sex: str) -> float | None:
        return {"F": self.threshold_female_kg_m2, "M": self.threshold_male_kg_m2}.get(sex)


def _value(data: Mapping, section: str, key: str, path: Path) -> object:
    try:
        return data[section][key]
    except (KeyError, TypeError) as exc:
        raise MeasurementSettingsError(f"{path}: [{section}] {key} is missing") from exc


def _float(data: Mapping, section: str, key: str, path: Path) -> float:
    value = _value(data, section, key, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MeasurementSettingsError(f"{path}: [{section}] {key} = {value!r}; allowed: a number")
    return float(value)


def _str(data: Mapping, section: str, key: str, path: Path) -> str:
    value = _value(data, section, key, path)
    if not isinstance(value, str):
        raise MeasurementSettingsError(f"{path}: [{section}] {key} = {value!r}; allowed: a string")
    return value


def _bool(data: Mapping, section: str, key: str, path: Path) -> bool:
    value = _value(data, section, key, path)
    if not isinstance(value, bool):
        raise MeasurementSettingsError(f"{path}: [{section}] {key} = {value!r}; allowed: true or false")
    return value


def _keys(data: Mapping, end: str, path: Path) -> tuple[str, ...]:
    """[group_coverage] <end> (label keys); the built-in list when the section is absent."""
    section = data.get("group_coverage", {})
    default = CROSSING_INFERIOR if end == "inferior" else CROSSING_SUPERIOR
    value = section.get(f"crossing_{end}", default) if isinstance(section, dict) else None
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) for k in value):
        raise MeasurementSettingsError(f"{path}: [group_coverage] crossing_{end} = {value!r}; allowed: a list of label keys")
    return tuple(value)


def _landmark(data: Mapping, path: Path) -> str:
    """[group_coverage] superior_landmark (a label key); the built-in one when absent."""
    section = data.get("group_coverage", {})
    value = section.get("superior_landmark", SUPERIOR_LANDMARK) if isinstance(section, dict) else None
    if not isinstance(value, str):
        raise MeasurementSettingsError(f"{path}: [group_coverage] superior_landmark = {value!r}; allowed: a label key")
    return value


def _group_thresholds(data: Mapping, path: Path) -> tuple[GroupThreshold, ...]:
    """[sarcopenia.group_thresholds.<group>] tables (none by default)."""
    tables = data.get("sarcopenia", {}).get("group_thresholds", {})
    if not isinstance(tables, dict):
        raise MeasurementSettingsError(f"{path}: [sarcopenia.group_thresholds] must hold one table per group")
    out = []
    for group in tables:
        name = f"sarcopenia.group_thresholds.{group}"
        section = {name: tables[group]}
        out.append(GroupThreshold(
            group=str(group),
            threshold_female_kg_m2=_float(section, name, "threshold_female_kg_m2", path),
            threshold_male_kg_m2=_float(section, name, "threshold_male_kg_m2", path),
            calibrated_for_ct=_bool(section, name, "calibrated_for_ct", path),
            source=_str(section, name, "source", path),
        ))
    return tuple(out)


def load_measurement_settings(path: Path | None = None) -> MeasurementSettings:
    """Read config/measurement.toml (or ``path``) into :class:`MeasurementSettings`."""
    path = Path(path) if path is not None else DEFAULT_MEASUREMENT_PATH
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MeasurementSettingsError(f"measurement settings {path} do not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MeasurementSettingsError(f"measurement settings {path} are not valid TOML: {exc}") from exc
    groups_table = data.get("groups")
    if not isinstance(groups_table, dict) or not groups_table:
        raise MeasurementSettingsError(f"{path}: [groups] is missing or empty")
    groups = []
    for name, members in groups_table.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise MeasurementSettingsError(f"{path}: [groups] {name} = {members!r}; allowed: a list of label groups")
        groups.append((str(name), tuple(members)))
    typical = data.get("plausible_volume", {}).get("typical_ml", {})
    if not isinstance(typical, dict):
        raise MeasurementSettingsError(f"{path}: [plausible_volume.typical_ml] must be a table of key = cm³")
    typical_ml = []
    for key, value in typical.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MeasurementSettingsError(f"{path}: plausible_volume.typical_ml.{key} = {value!r}; allowed: a number (cm³)")
        typical_ml.append((str(key), float(value)))
    try:
        return MeasurementSettings(
            fat_min_hu=_float(data, "hu", "fat_min_hu", path),
            fat_max_hu=_float(data, "hu", "fat_max_hu", path),
            metal_threshold_hu=_float(data, "metal", "threshold_hu", path),
            metal_proximity_mm=_float(data, "metal", "proximity_mm", path),
            metal_min_volume_ml=_float(data, "metal", "min_volume_ml", path),
            groups=tuple(groups),
            sarcopenia_group=_str(data, "sarcopenia", "group", path),
            threshold_female_kg_m2=_float(data, "sarcopenia", "threshold_female_kg_m2", path),
            threshold_male_kg_m2=_float(data, "sarcopenia", "threshold_male_kg_m2", path),
            calibrated_for_ct=_bool(data, "sarcopenia", "calibrated_for_ct", path),
            threshold_source=_str(data, "sarcopenia", "source", path),
            plausible_reference_height_m=_float(data, "plausible_volume", "reference_height_m", path),
            plausible_min_factor=_float(data, "plausible_volume", "min_factor", path),
            plausible_max_factor=_float(data, "plausible_volume", "max_factor", path),
            plausible_typical_ml=tuple(typical_ml),
            crossing_inferior=_keys(data, "inferior", path),
            crossing_superior=_keys(data, "superior", path),
            superior_landmark=_landmark(data, path),
            gluteal_min_reach_mm=read_gluteal_min_reach(data, path, MeasurementSettingsError),
            group_thresholds=_group_thresholds(data, path),
        )
    except MeasurementSettingsError as exc:
        raise MeasurementSettingsError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class _BinStats:
    """Sums per bin ``label*3 + side`` (arrays of length n_labels*3)."""

    count: np.ndarray
    hu_sum: np.ndarray
    hu_sumsq: np.ndarray
    fat_count: np.ndarray


def _bin_index(label_map: np.ndarray, side_map: np.ndarray) -> np.ndarray:
    return label_map.astype(np.intp, copy=False) * _N_SIDE_CODES + side_map.astype(np.intp, copy=False)


def _bin_stats(volume: Volume, seg: Segmentation, n_bins: int, settings: MeasurementSettings) -> _BinStats:
    count = np.zeros(n_bins, dtype=np.int64)
    hu_sum = np.zeros(n_bins)
    hu_sumsq = np.zeros(n_bins)
    fat_count = np.zeros(n_bins, dtype=np.int64)
    nk = volume.hu.shape[0]
    slab = max(1, _SLAB_VOXELS // max(1, volume.hu.shape[1] * volume.hu.shape[2]))
    for k0 in range(0, nk, slab):
        lab = seg.label_map[k0 : k0 + slab].ravel()
        fg = np.flatnonzero(lab)  # background is most of the volume: skip it
        if fg.size == 0:
            continue
        idx = _bin_index(lab[fg], seg.side_map[k0 : k0 + slab].ravel()[fg])
        hu = volume.hu[k0 : k0 + slab].ravel()[fg].astype(np.float64)
        count += np.bincount(idx, minlength=n_bins)
        hu_sum += np.bincount(idx, weights=hu, minlength=n_bins)
        hu_sumsq += np.bincount(idx, weights=hu * hu, minlength=n_bins)
        fat = (hu >= settings.fat_min_hu) & (hu <= settings.fat_max_hu)
        fat_count += np.bincount(idx[fat], minlength=n_bins)
    return _BinStats(count, hu_sum, hu_sumsq, fat_count)


def _superior_end(affine_lps: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(axis most aligned with patient z, index of its superior end, of its inferior end)."""
    z_steps = affine_lps[2, :3]
    axis = int(np.argmax(np.abs(z_steps)))
    last = shape[axis] - 1
    return (axis, last, 0) if z_steps[axis] > 0 else (axis, 0, last)


def _face_counts(seg: Segmentation, axis: int, index: int, n_bins: int) -> np.ndarray:
    lab = np.take(seg.label_map, index, axis=axis)
    side = np.take(seg.side_map, index, axis=axis)
    return np.bincount(_bin_index(lab, side).ravel(), minlength=n_bins)


@dataclass(frozen=True)
class _MetalResult:
    near_counts: np.ndarray  # per bin: voxels within proximity of metal
    pieces: tuple[tuple[float, str], ...]  # (volume ml, side name of the implant) per metal piece


def _metal_near(volume: Volume, seg: Segmentation, n_bins: int, settings: MeasurementSettings) -> _MetalResult:
    near = np.zeros(n_bins, dtype=np.int64)
    metal = volume.hu > settings.metal_threshold_hu
    if not metal.any():
        return _MetalResult(near, ())
    spacing = volume.spacing_mm
    # label the metal only inside its bounding box (a full-volume int32 label array is large)
    outer = tuple(
        slice(int(np.argmax(a)), len(a) - int(np.argmax(a[::-1])))
        for a in (metal.any(axis=(1, 2)), metal.any(axis=(0, 2)), metal.any(axis=(0, 1)))
    )
    structure = ndimage.generate_binary_structure(3, 3)
    pieces_lab, n_pieces = ndimage.label(metal[outer], structure=structure)
    offset = [o.start for o in outer]
    sizes = np.bincount(pieces_lab.ravel(), minlength=n_pieces + 1)
    min_voxels = settings.metal_min_volume_ml / volume.voxel_volume_ml
    margin = [int(math.ceil(settings.metal_proximity_mm / s)) + 1 for s in spacing]
    pieces = []
    for piece_id, box in enumerate(ndimage.find_objects(pieces_lab), start=1):
        if box is None or sizes[piece_id] < min_voxels:
            continue
        local = tuple(b for b in box)
        box = tuple(
            slice(max(b.start + o - m, 0), min(b.stop + o + m, n))
            for b, o, m, n in zip(local, offset, margin, volume.hu.shape)
        )
        piece = np.zeros([b.stop - b.start for b in box], dtype=bool)
        inner = tuple(slice(b.start + o - bb.start, b.stop + o - bb.start) for b, o, bb in zip(local, offset, box))
        piece[inner] = pieces_lab[local] == piece_id
        dist = ndimage.distance_transform_edt(~piece, sampling=spacing)
        close = dist <= settings.metal_proximity_mm
        idx = _bin_index(seg.label_map[box][close], seg.side_map[box][close])
        counts = np.bincount(idx, minlength=n_bins)
        counts[:_N_SIDE_CODES] = 0  # background
        near += counts
        by_side = counts.reshape(-1, _N_SIDE_CODES).sum(axis=0)
        side = "unknown side"
        if by_side[SIDE_LEFT] or by_side[SIDE_RIGHT]:
            side = "left" if by_side[SIDE_LEFT] >= by_side[SIDE_RIGHT] else "right"
        pieces.append((float(sizes[piece_id] * volume.voxel_volume_ml), side))
    return _MetalResult(near, tuple(pieces))


# --------------------------------------------------------------------------- height


def _resolve_height(
    patient: PatientInfo, height_m: float | None, height_source: str
) -> tuple[float | None, str, QualityFlag | None]:
    if height_m is not None:
        if not MIN_HEIGHT_M <= float(height_m) <= MAX_HEIGHT_M:
            raise ValueError(
                f"recorded height {height_m!r} m is outside {MIN_HEIGHT_M}..{MAX_HEIGHT_M} m (is it in cm?)"
            )
        return float(height_m), height_source or HEIGHT_SOURCE_RECORDED, None
    if patient.height_m is not None:
        if MIN_HEIGHT_M <= float(patient.height_m) <= MAX_HEIGHT_M:
            return float(patient.height_m), HEIGHT_SOURCE_PATIENT_SIZE, None
        return None, "", QualityFlag(
            FLAG_NO_HEIGHT,
            f"PatientSize (0010,1020) is {patient.height_m!r} m, outside {MIN_HEIGHT_M}..{MAX_HEIGHT_M} m "
            "(perhaps entered in cm), and no height was recorded: volume/height² and SMI are not given",
        )
    return None, "", QualityFlag(
        FLAG_NO_HEIGHT,
        "No patient height: PatientSize (0010,1020) is empty and none was recorded; "
        "volume/height² and SMI are not given",
    )


# --------------------------------------------------------------------------- measure


def _check_inputs(volume: Volume, seg: Segmentation) -> None:
    if seg.label_map.shape != volume.hu.shape:
        raise ValueError(
            f"segmentation shape {seg.label_map.shape} differs from volume shape {volume.hu.shape}: "
            "the label map must be on the volume's grid"
        )
    if not np.issubdtype(seg.label_map.dtype, np.integer) or not np.issubdtype(seg.side_map.dtype, np.integer):
        raise ValueError(
            f"label_map ({seg.label_map.dtype}) and side_map ({seg.side_map.dtype}) must be integer arrays"
        )
    n_labels = len(seg.labels.labels)
    lo, hi = int(seg.label_map.min()), int(seg.label_map.max())
    if lo < 0 or hi > n_labels:
        raise ValueError(f"label_map holds ids {lo}..{hi}; the label table allows 0..{n_labels}")
    slo, shi = int(seg.side_map.min()), int(seg.side_map.max())
    if slo < SIDE_NONE or shi > SIDE_LEFT:
        raise ValueError(f"side_map holds {slo}..{shi}; allowed: 0 (none), 1 (right), 2 (left)")


def _structure(
    label_id: int, table: LabelTable, side: str, bins: Sequence[int], stats: _BinStats, voxel_ml: float,
    flags: tuple[str, ...], near_metal: np.ndarray,
) -> StructureMeasurement:
    label = table.by_id(label_id)
    n = int(sum(int(stats.count[b]) for b in bins))
    s = float(sum(stats.hu_sum[b] for b in bins))
    ss = float(sum(stats.hu_sumsq[b] for b in bins))
    fat = int(sum(int(stats.fat_count[b]) for b in bins))
    mean = s / n if n else 0.0
    std = math.sqrt(max(ss / n - mean * mean, 0.0)) if n else 0.0
    return StructureMeasurement(
        label_id=label_id, key=label.key, name=label.name, group=label.group, side=side,
        voxel_count=n, volume_ml=n * voxel_ml, mean_hu=mean, std_hu=std,
        mass_g=(n + s / 1000.0) * voxel_ml,  # Σ (1 + HU/1000) g/cm³ x V_voxel cm³
        fat_fraction=fat / n if n else 0.0,
        flags=flags,
        near_metal_voxels=int(sum(int(near_metal[b]) for b in bins)),
    )


@dataclass(frozen=True)
class _FlagEvidence:
    """What the flags of a structure are decided from; arrays are per bin ``label*3 + side``."""

    stats: _BinStats
    top: np.ndarray  # voxels on the superior face of the field of view
    bottom: np.ndarray  # voxels on the inferior face
    metal: _MetalResult
    settings: MeasurementSettings
    height_m: float | None
    voxel_ml: float


def _one_side_flags(
    key: str, side_name: str, b: int, ev: _FlagEvidence
) -> tuple[list[str], dict[tuple[str, str, str], str]]:
    """Flag codes of a structure on one side (bin ``b``) and their details by (code, key, side)."""
    codes: list[str] = []
    details: dict[tuple[str, str, str], str] = {}
    n = int(ev.stats.count[b])
    if n == 0:
        codes.append(FLAG_EMPTY)
        return codes, details
    if ev.top[b]:
        codes.append(FLAG_PARTIAL_TOP)
    if ev.bottom[b]:
        codes.append(FLAG_PARTIAL_BOTTOM)
    if ev.metal.near_counts[b]:
        codes.append(FLAG_METAL)
        details[(FLAG_METAL, key, side_name)] = f"{int(ev.metal.near_counts[b])} voxels"
    rng = ev.settings.plausible_range_ml(key, ev.height_m)
    vol = n * ev.voxel_ml
    if not (FLAG_PARTIAL_TOP in codes or FLAG_PARTIAL_BOTTOM in codes) and rng is not None:
        if not rng[0] <= vol <= rng[1]:
            codes.append(FLAG_IMPLAUSIBLE_VOLUME)
            details[(FLAG_IMPLAUSIBLE_VOLUME, key, side_name)] = (
                f"{vol:.1f} cm³, plausible {rng[0]:.0f}..{rng[1]:.0f} cm³"
            )
    return codes, details


def _both_sides_flags(
    key: str, all_bins: list[int], ev: _FlagEvidence
) -> tuple[list[str], dict[tuple[str, str, str], str]]:
    """Flag codes of a structure over all its voxels (side "both"; plausible range doubled) and their details."""
    both: list[str] = []
    details: dict[tuple[str, str, str], str] = {}
    n_all = int(ev.stats.count[all_bins].sum())
    if n_all == 0:
        both.append(FLAG_EMPTY)
        return both, details
    if ev.top[all_bins].any():
        both.append(FLAG_PARTIAL_TOP)
    if ev.bottom[all_bins].any():
        both.append(FLAG_PARTIAL_BOTTOM)
    if ev.metal.near_counts[all_bins].any():
        both.append(FLAG_METAL)
    rng = ev.settings.plausible_range_ml(key, ev.height_m)
    if rng is not None and not any(c in both for c in (FLAG_PARTIAL_TOP, FLAG_PARTIAL_BOTTOM)):
        vol = n_all * ev.voxel_ml
        if not 2 * rng[0] <= vol <= 2 * rng[1]:
            both.append(FLAG_IMPLAUSIBLE_VOLUME)
            details[(FLAG_IMPLAUSIBLE_VOLUME, key, SIDE_BOTH)] = (
                f"{vol:.1f} cm³ both sides, plausible {2 * rng[0]:.0f}..{2 * rng[1]:.0f} cm³"
            )
    return both, details


def measure(
    volume: Volume,
    segmentation: Segmentation,
    patient: PatientInfo,
    settings: MeasurementSettings,
    *,
    height_m: float | None = None,
    height_source: str = "",
) -> Measurements:
    """Measure every structure of ``segmentation`` on ``volume`` (see the module docstring).

    ``height_m`` (recorded by the operator) wins over ``patient.height_m`` (PatientSize);
    ``height_source`` names where it came from (default "recorded").
    """
    t0 = time.perf_counter()
    _check_inputs(volume, segmentation)
    table = segmentation.labels
    n_labels = len(table.labels)
    n_bins = (n_labels + 1) * _N_SIDE_CODES
    voxel_ml = volume.voxel_volume_ml

    height, source, height_flag = _resolve_height(patient, height_m, height_source)
    stats = _bin_stats(volume, segmentation, n_bins, settings)
    axis, top_index, bottom_index = _superior_end(volume.affine_lps, volume.hu.shape)
    top = _face_counts(segmentation, axis, top_index, n_bins)
    bottom = _face_counts(segmentation, axis, bottom_index, n_bins)
    metal = _metal_near(volume, segmentation, n_bins, settings)
    implant_sides = sorted({side for _, side in metal.pieces})
    ev = _FlagEvidence(stats, top, bottom, metal, settings, height, voxel_ml)

    structures: list[StructureMeasurement] = []
    flag_sides: dict[tuple[str, str], list[str]] = {}  # (code, key) -> sides it applies to
    details: dict[tuple[str, str, str], str] = {}  # (code, key, side) -> detail text
    for label in table.labels:
        lid = label.id
        for side_name, side_code in SIDES:
            b = lid * _N_SIDE_CODES + side_code
            codes, more = _one_side_flags(label.key, side_name, b, ev)
            details.update(more)
            structures.append(with_uncertainty(
                _structure(lid, table, side_name, [b], stats, voxel_ml, tuple(codes), metal.near_counts), segmentation))
            for code in codes:
                flag_sides.setdefault((code, label.key), []).append(side_name)
        all_bins = [lid * _N_SIDE_CODES + s for s in range(_N_SIDE_CODES)]
        both, more = _both_sides_flags(label.key, all_bins, ev)
        details.update(more)
        structures.append(with_uncertainty(
            _structure(lid, table, SIDE_BOTH, all_bins, stats, voxel_ml, tuple(both), metal.near_counts), segmentation))
        if FLAG_IMPLAUSIBLE_VOLUME in both and (FLAG_IMPLAUSIBLE_VOLUME, label.key) not in flag_sides:
            # each side alone is plausible, their sum is not: one flag for "both"
            flag_sides[(FLAG_IMPLAUSIBLE_VOLUME, label.key)] = [SIDE_BOTH]

    flags: list[QualityFlag] = [height_flag] if height_flag is not None else []
    flags.extend(_structure_flags(table, flag_sides, details, settings, metal, implant_sides))
    reach = femur_reach_mm(segmentation, axis, bottom_index, volume.affine_lps)
    groups = measure_groups(structures, table, settings, height, reach)
    sarcopenia, not_assessed = assess_sarcopenia(groups, settings, height, patient.sex)
    logger.info(
        "measured %d structures on %s voxels in %.2f s (%d flags, metal pieces %d)",
        n_labels, "x".join(map(str, volume.hu.shape)), time.perf_counter() - t0, len(flags), len(metal.pieces),
    )
    return Measurements(
        structures=tuple(structures),
        groups=groups,
        flags=tuple(flags),
        height_m=height,
        height_source=source,
        sex=patient.sex,
        density_formula=DENSITY_FORMULA,
        sarcopenia=sarcopenia,
        voxel_volume_ml=voxel_ml,
        sarcopenia_not_assessed=not_assessed,
        metal_proximity_mm=settings.metal_proximity_mm,
    )


def _structure_flags(
    table: LabelTable,
    flag_sides: dict[tuple[str, str], list[str]],
    details: dict[tuple[str, str, str], str],
    settings: MeasurementSettings,
    metal: _MetalResult,
    implant_sides: Sequence[str],
) -> list[QualityFlag]:
    """One QualityFlag per structure and code; one with side "both" when it applies to left and right."""
    out: list[QualityFlag] = []
    implant = " and ".join(f"the patient's {s}" for s in implant_sides) or "an unknown side"
    metal_ml = sum(v for v, _ in metal.pieces)
    for (code, key), sides in flag_sides.items():
        name = table.by_key(key).name
        merged = [SIDE_BOTH] if set(sides) >= {"left", "right"} else sides
        if code == FLAG_METAL:
            merged = sides  # the side matters: keep one flag per side
        for side in merged:
            where = "on both sides" if side == SIDE_BOTH else f"on the {side}"
            per_side = "; ".join(
                f"{s} {details[(code, key, s)]}" for s in sides if s != SIDE_BOTH and (code, key, s) in details
            )
            detail = per_side if side == SIDE_BOTH and per_side else details.get((code, key, side), "")
            if code == FLAG_PARTIAL_TOP:
                msg = f"{name} {where} reaches the upper (superior) end of the scan: its volume and mass are partial"
            elif code == FLAG_PARTIAL_BOTTOM:
                msg = f"{name} {where} reaches the lower (inferior) end of the scan: its volume and mass are partial"
            elif code == FLAG_METAL:
                msg = (
                    f"{name} {where} lies within {settings.metal_proximity_mm:g} mm of metal "
                    f"(implant on {implant}, {metal_ml:.1f} cm³ above {settings.metal_threshold_hu:g} HU; {detail}): "
                    "HU, fat fraction and mass are unreliable, the outline may be too"
                )
            elif code == FLAG_IMPLAUSIBLE_VOLUME:
                msg = f"{name} {where}: volume outside the plausible range for the patient's height ({detail}); check the segmentation"
            elif code == FLAG_EMPTY:
                msg = f"{name} was not found " + ("on either side" if side == SIDE_BOTH else f"on the {side}")
            else:  # pragma: no cover - all codes are handled above
                msg = f"{name} {where}: {code}"
            out.append(QualityFlag(code=code, message=msg, structure=key, side=side))
    return out
