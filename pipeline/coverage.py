"""Which body regions an axial CT series covers, and the field-of-view policy built on it.

Model-free (:func:`find_coverage`), from the hole-filled in-plane bone components of every
axial slice (:func:`pipeline.bodypart.find_bone_components`; metal counts as bone, so an
implant does not hide a region). A slice belongs to a region when it shows:

* **thigh**: a femoral shaft cross-section on the left AND on the right
  (:func:`pipeline.bodypart.classify_shafts`, at ``shaft_bone_hu``). Both sides are
  required: a single round lateral bone may be an arm at the side of an abdomen. A
  one-legged study is still accepted by its hip.
* **hip**: a femoral head: a thick, round bone component (equivalent diameter
  ``head_min_mm``..``head_max_mm``, roundness >= ``head_min_roundness``, largest inscribed
  disc >= ``head_min_inscribed_mm``, some cortical bone or metal in it) lying
  ``head_min_offset_mm``..``head_max_offset_mm`` beside the body midline on at least one
  side, within ``pelvis_reach_mm`` of pelvic bone (iliac wings, or bone on the midline:
  sacrum, coccyx, pubic symphysis). At ``bone_hu`` (150 HU: cancellous bone included)
  the head merges with its acetabulum; the merged component is still thick and compact.
  A prosthesis head is metal and counts the same.
* **pelvis**: iliac wings: a large (>= ``wing_min_area_cm2``), elongated bone component
  on both sides.
* **knee**: a wide compact bone (condyles, tibial plateau: equivalent diameter >=
  ``knee_min_mm``) beside the midline on at least one side, far from any pelvic bone and
  below the thigh when the thigh is seen.
* **below_knee**: on at least one side, two separate long-bone cross-sections (tibia
  and fibula) and no large bone in the slice, far from pelvic bone.

Each region is reported with the z extent (patient z, mm, LPS: superior positive) of its
longest run of slices (gaps up to ``max_gap_mm`` bridged: a femoral head and the
trochanter below it are one hip), slice thickness included.

:func:`check_field_of_view` applies a :class:`CoveragePolicy`: a series is processed when
at least one of ``accept_regions`` is seen over ``min_region_mm``; otherwise it is
declined with a one-line reason that says what was seen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.bodypart import BoneComponents, FemurShaftCriteria, classify_shafts, find_bone_components, longest_run
from pipeline.errors import DeclinedError
from pipeline.types import Segmentation, Volume

logger = logging.getLogger(__name__)

#: The regions, from head to foot.
REGIONS = ("pelvis", "hip", "thigh", "knee", "below_knee")

#: The label groups (config/labels.toml) whose structures show a region in a segmentation.
SEGMENTATION_REGIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hip", ("gluteal",)),
    ("thigh", ("anterior", "medial", "posterior")),
)
#: A region's muscles must add up to this much to count as present in the segmentation.
MIN_SEGMENTED_ML = 10.0


@dataclass(frozen=True)
class CoverageCriteria:
    """What each region's bone looks like in an axial slice (defaults: adults)."""

    bone_hu: float = 150.0
    dense_hu: float = 300.0
    min_dense_fraction: float = 0.2
    head_min_mm: float = 35.0
    head_max_mm: float = 65.0
    head_min_roundness: float = 0.5
    head_min_inscribed_mm: float = 22.0
    head_min_offset_mm: float = 50.0
    head_max_offset_mm: float = 130.0
    pelvis_reach_mm: float = 100.0
    midline_mm: float = 30.0
    midline_min_area_cm2: float = 3.0
    wing_min_area_cm2: float = 10.0
    wing_max_roundness: float = 0.45
    lateral_max_mm: float = 170.0
    knee_min_mm: float = 55.0
    knee_min_roundness: float = 0.55
    tibia_area_cm2: tuple[float, float] = (2.0, 15.0)
    fibula_area_cm2: tuple[float, float] = (0.3, 3.0)
    tibia_fibula_mm: tuple[float, float] = (15.0, 80.0)
    max_gap_mm: float = 30.0
    shaft: FemurShaftCriteria = FemurShaftCriteria()


@dataclass(frozen=True)
class RegionExtent:
    """A region seen: the z range (patient z, mm) of its longest run and the slices that show it."""

    region: str
    z_mm: tuple[float, float]
    length_mm: float
    slices: int


@dataclass(frozen=True)
class Coverage:
    """The regions an axial series covers (head to foot), the series' z range and the evidence."""

    regions: tuple[RegionExtent, ...]
    z_range_mm: tuple[float, float]
    n_slices: int
    evidence: str

    def get(self, region: str) -> RegionExtent | None:
        return next((r for r in self.regions if r.region == region), None)

    def describe(self) -> str:
        """E.g. "hip (54 mm), pelvis (120 mm)"; "none" without any."""
        return ", ".join(f"{r.region} ({r.length_mm:.0f} mm)" for r in self.regions) or "none"

    def to_record(self) -> dict[str, list[float]]:
        """{region: [z0, z1]} (mm, rounded) for the job record."""
        return {r.region: [round(r.z_mm[0], 1), round(r.z_mm[1], 1)] for r in self.regions}


@dataclass(frozen=True)
class CoveragePolicy:
    """Which series are processed: one of ``accept_regions`` seen over at least ``min_region_mm``."""

    accept_regions: tuple[str, ...] = ("hip", "thigh")
    min_region_mm: float = 20.0

    def __post_init__(self) -> None:
        bad = [r for r in self.accept_regions if r not in REGIONS]
        if not self.accept_regions or bad:
            raise ValueError(f"accept_regions = {list(self.accept_regions)!r}: a non-empty list of {list(REGIONS)}")
        if not (math.isfinite(self.min_region_mm) and self.min_region_mm > 0):
            raise ValueError(f"min_region_mm = {self.min_region_mm!r}: a number of mm > 0")

    def to_record(self) -> dict[str, object]:
        return {"accept_regions": list(self.accept_regions), "min_region_mm": self.min_region_mm}


# --------------------------------------------------------------------------- per-slice evidence


def _per_slice(n: int, idx: np.ndarray, sel: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[idx[sel]] = True
    return out


def _sided(bones: BoneComponents, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: a selected component on the patient's left, on the right (LPS: x > 0 left)."""
    n, idx = bones.n_slices, bones.slice_idx
    return _per_slice(n, idx, sel & (bones.offset_mm > 0)), _per_slice(n, idx, sel & (bones.offset_mm < 0))


def _near(flags: np.ndarray, z: np.ndarray, reach_mm: float) -> np.ndarray:
    """Per slice: some flagged slice lies within ``reach_mm`` of z."""
    zf = z[flags]
    if zf.size == 0:
        return np.zeros(z.size, dtype=bool)
    return np.abs(z[:, None] - zf[None, :]).min(axis=1) <= reach_mm


def _pelvic_slices(bones: BoneComponents, crit: CoverageCriteria) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: (iliac wings on both sides, bone on the midline)."""
    off = np.abs(bones.offset_mm)
    wing = (
        (bones.area_mm2 >= crit.wing_min_area_cm2 * 100.0)
        & (bones.roundness <= crit.wing_max_roundness)
        & (off >= crit.midline_mm) & (off <= crit.lateral_max_mm)
    )
    left, right = _sided(bones, wing)
    midline = (off < crit.midline_mm) & (bones.area_mm2 >= crit.midline_min_area_cm2 * 100.0)
    return left & right, _per_slice(bones.n_slices, bones.slice_idx, midline)


def _head_slices(bones: BoneComponents, crit: CoverageCriteria) -> np.ndarray:
    """Per slice: a femoral-head-like component beside the midline (before the pelvis condition)."""
    eq_mm = 2.0 * np.sqrt(bones.area_mm2 / math.pi)
    off = np.abs(bones.offset_mm)
    head = (
        (eq_mm >= crit.head_min_mm) & (eq_mm <= crit.head_max_mm)
        & (bones.roundness >= crit.head_min_roundness)
        & (bones.inscribed_mm >= crit.head_min_inscribed_mm)
        & (bones.dense_fraction >= crit.min_dense_fraction)
        & (off >= crit.head_min_offset_mm) & (off <= crit.head_max_offset_mm)
    )
    return _per_slice(bones.n_slices, bones.slice_idx, head)


def _knee_slices(bones: BoneComponents, crit: CoverageCriteria) -> np.ndarray:
    eq_mm = 2.0 * np.sqrt(bones.area_mm2 / math.pi)
    off = np.abs(bones.offset_mm)
    wide = (
        (eq_mm >= crit.knee_min_mm) & (bones.roundness >= crit.knee_min_roundness)
        & (off >= crit.midline_mm) & (off <= crit.lateral_max_mm)
        & (bones.dense_fraction >= crit.min_dense_fraction)
    )
    return _per_slice(bones.n_slices, bones.slice_idx, wide)


def _below_knee_slices(bones: BoneComponents, crit: CoverageCriteria) -> np.ndarray:
    """Per slice: on one side at least, a tibia-sized and a fibula-sized bone apart; nothing large."""
    n, idx, a_cm2 = bones.n_slices, bones.slice_idx, bones.area_mm2 / 100.0
    large = _per_slice(n, idx, a_cm2 > crit.tibia_area_cm2[1])
    tibia = (a_cm2 >= crit.tibia_area_cm2[0]) & (a_cm2 <= crit.tibia_area_cm2[1])
    fibula = (a_cm2 >= crit.fibula_area_cm2[0]) & (a_cm2 <= crit.fibula_area_cm2[1])
    found = np.zeros(n, dtype=bool)
    lo, hi = crit.tibia_fibula_mm
    for t in np.flatnonzero(tibia & (np.abs(bones.offset_mm) >= crit.midline_mm)):
        same = (idx == idx[t]) & fibula & (np.sign(bones.offset_mm) == np.sign(bones.offset_mm[t]))
        apart = np.abs(bones.offset_mm[same] - bones.offset_mm[t])
        if np.any((apart >= lo) & (apart <= hi)):
            found[idx[t]] = True
    return found & ~large


def _extent(region: str, flags: np.ndarray, bones: BoneComponents, max_gap_mm: float) -> RegionExtent | None:
    length, z = longest_run(flags, bones.z_mm, bones.slice_mm, int(max_gap_mm / bones.slice_mm))
    if z is None:
        return None
    return RegionExtent(region, z, length, int(flags.sum()))


def find_coverage(volume: Volume, criteria: CoverageCriteria | None = None) -> Coverage:
    """The regions of :data:`REGIONS` that the series shows, each with its z extent."""
    crit = criteria if criteria is not None else CoverageCriteria()
    shafts = classify_shafts(
        find_bone_components(volume, crit.shaft.bone_hu, crit.shaft.body_hu, thickness=False), crit.shaft
    )
    bones = find_bone_components(volume, crit.bone_hu, crit.shaft.body_hu, crit.dense_hu)
    z = bones.z_mm
    wings, midline = _pelvic_slices(bones, crit)
    near_pelvis = _near(wings | midline, z, crit.pelvis_reach_mm)
    flags = {
        "pelvis": wings,
        "hip": _head_slices(bones, crit) & near_pelvis,
        "knee": _knee_slices(bones, crit) & ~near_pelvis,
        "below_knee": _below_knee_slices(bones, crit) & ~near_pelvis,
    }
    if shafts.run_z_mm is not None:
        # a tibia pair also looks like a shaft pair: where the fibulae show, it is the lower leg
        flags["thigh"] = (z >= shafts.run_z_mm[0]) & (z <= shafts.run_z_mm[1]) & ~flags["below_knee"]
        flags["knee"] &= z < shafts.run_z_mm[0]  # the knee lies below the thigh
    found = [_extent(r, flags[r], bones, crit.max_gap_mm) for r in REGIONS if r in flags]
    regions = tuple(r for r in found if r is not None)
    evidence = (
        f"{bones.n_slices} axial slices (z {z.min():.0f}..{z.max():.0f} mm): "
        f"iliac wings in {int(wings.sum())}, midline bone in {int(midline.sum())}, "
        f"femoral-head-like bone near the pelvis in {int(flags['hip'].sum())}, "
        f"femoral shaft pairs in {shafts.pair_slices} (longest run {shafts.run_mm:.0f} mm), "
        f"condyle-like bone in {int(flags['knee'].sum())}, tibia+fibula in {int(flags['below_knee'].sum())}"
    )
    return Coverage(regions, (float(z.min()), float(z.max())), bones.n_slices, evidence)


def check_field_of_view(volume: Volume, policy: CoveragePolicy, criteria: CoverageCriteria | None = None) -> Coverage:
    """The series' coverage; raise :class:`DeclinedError` unless the policy accepts it."""
    t0 = time.perf_counter()
    coverage = find_coverage(volume, criteria)
    accepted = [
        r.region for r in coverage.regions
        if r.region in policy.accept_regions and r.length_mm >= policy.min_region_mm
    ]
    logger.info(
        "field of view: %s; %s in %.2f s",
        coverage.describe(), "accepted" if accepted else "declined", time.perf_counter() - t0,
    )
    if not accepted:
        wanted = " or ".join(policy.accept_regions)
        raise DeclinedError(
            f"no {wanted} in the field of view (at least {policy.min_region_mm:.0f} mm of one is needed): "
            f"regions seen: {coverage.describe()}; {coverage.evidence}",
            study_uid=volume.study_instance_uid or None,
        )
    return coverage


def regions_from_segmentation(segmentation: Segmentation, voxel_ml: float) -> tuple[str, ...]:
    """The regions the segmentation supports, from the label groups of :data:`SEGMENTATION_REGIONS`.

    A region counts when its muscles add up to at least :data:`MIN_SEGMENTED_ML`; it is
    written "<region> (cut)" when they reach the first or last axial slice (the field of
    view ends inside them), e.g. ``("hip", "thigh (cut)")`` for a hip CT.
    """
    labels = segmentation.label_map
    axis = int(np.argmax(np.abs(segmentation.affine_lps[2, :3])))
    counts = np.zeros(max(segmentation.labels.num_classes, 256), dtype=np.int64)
    for k in range(0, labels.shape[0], 16):  # bincount of the whole map would copy it to int64 first (issue 24)
        counts += np.bincount(labels[k:k + 16].ravel(), minlength=counts.size)
    first = np.bincount(np.take(labels, 0, axis=axis).ravel(), minlength=counts.size)
    last = np.bincount(np.take(labels, -1, axis=axis).ravel(), minlength=counts.size)
    found = []
    for region, groups in SEGMENTATION_REGIONS:
        ids = [label.id for label in segmentation.labels.labels if label.group in groups]
        if not ids or counts[ids].sum() * voxel_ml < MIN_SEGMENTED_ML:
            continue
        cut = bool(first[ids].sum() or last[ids].sum())
        found.append(f"{region} (cut)" if cut else region)
    return tuple(found)
