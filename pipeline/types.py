"""Frozen hand-off types between pipeline stages (units in the field names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from pipeline.labels import LabelTable

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.uncertainty import SegmentationUncertainty


def _frozen_array(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units on a regular grid.

    ``hu`` is float32 with axes ``(k, r, c)`` = (slice, row, column): ``hu[k]`` is the
    k-th slice in ascending order along the slice normal (row direction x column
    direction), ``hu[k, r, c]`` the pixel in row r and column c of that slice.

    ``affine_lps`` (4x4, mm) maps the homogeneous index ``(k, r, c, 1)`` to a point
    in the patient coordinate system (LPS, PS3.3 C.7.6.2.1.1):
    column 0 = step between slices, column 1 = PixelSpacing[0] x column direction
    (ImageOrientationPatient[3:6]), column 2 = PixelSpacing[1] x row direction
    (ImageOrientationPatient[0:3]), column 3 = ImagePositionPatient of slice 0.

    ``sop_instance_uids[k]`` is the source instance of slice k.
    """

    hu: np.ndarray
    affine_lps: np.ndarray
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must be 3-D (k, r, c); shape is {self.hu.shape}")
        if self.affine_lps.shape != (4, 4):
            raise ValueError(f"Volume.affine_lps must be 4x4; shape is {self.affine_lps.shape}")
        if len(self.sop_instance_uids) not in (0, self.hu.shape[0]):
            raise ValueError(
                f"Volume has {self.hu.shape[0]} slices but {len(self.sop_instance_uids)} source SOP Instance UIDs"
            )
        object.__setattr__(self, "hu", _frozen_array(self.hu))
        object.__setattr__(self, "affine_lps", _frozen_array(np.asarray(self.affine_lps, dtype=np.float64)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (k, r, c) in mm."""
        return tuple(float(np.linalg.norm(self.affine_lps[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in cm³ (= ml)."""
        return float(abs(np.linalg.det(self.affine_lps[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class PatientInfo:
    """What the measurements and reports need about the patient (PHI: never log it)."""

    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""  # "F", "M", "O" or ""
    age: str = ""  # PatientAge, e.g. "067Y"
    height_m: float | None = None  # PatientSize
    weight_kg: float | None = None  # PatientWeight


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen from a study, and which rule decided it."""

    study_instance_uid: str
    series_instance_uid: str
    paths: tuple[Path, ...]
    rule: str  # human-readable: why this series won
    description: str = ""  # SeriesDescription
    convolution_kernel: str = ""
    slice_thickness_mm: float | None = None
    rejected: tuple[tuple[str, str], ...] = ()  # (SeriesInstanceUID, reason) for the others
    # Read once by selection and handed on (loading, outputs): no header is parsed twice for a job.
    headers: tuple[Dataset, ...] = ()  # pixel-less headers of ``paths``, same order (never mutate)
    patient: PatientInfo = PatientInfo()
    study_date: str = ""  # StudyDate (DA) of the selected series, "" when absent


@dataclass(frozen=True)
class Segmentation:
    """A label map on a volume's grid.

    ``label_map[k, r, c]`` is a structure id of ``labels`` (0 = background);
    ``side_map`` is 0 (none), 1 (right) or 2 (left), the patient's side, split at the
    midline; both have the volume's shape and axis order.
    """

    label_map: np.ndarray
    side_map: np.ndarray
    labels: LabelTable
    model_name: str
    model_version: str
    affine_lps: np.ndarray = field(repr=False, default_factory=lambda: np.eye(4))
    #: sha256 (hex) of the model's weights file (pipeline.bundle.Bundle.weights_sha256); "" when unknown.
    model_sha256: str = ""
    #: Test-time augmentation summaries (pipeline.uncertainty); None when ``[model] uncertainty = "off"``.
    uncertainty: SegmentationUncertainty | None = field(repr=False, default=None)

    def __post_init__(self) -> None:
        if self.label_map.shape != self.side_map.shape:
            raise ValueError(
                f"label_map shape {self.label_map.shape} differs from side_map shape {self.side_map.shape}"
            )
        object.__setattr__(self, "label_map", _frozen_array(self.label_map))
        object.__setattr__(self, "side_map", _frozen_array(self.side_map))
        object.__setattr__(self, "affine_lps", _frozen_array(np.asarray(self.affine_lps, dtype=np.float64)))


SIDE_NONE = 0
SIDE_RIGHT = 1
SIDE_LEFT = 2
SIDE_NAMES = {SIDE_NONE: "none", SIDE_RIGHT: "right", SIDE_LEFT: "left"}


# ---------------------------------------------------------------------------
# Measurements (pipeline/measure.py produces them; dicomout's SEG/SR/PDF builders read them).

SIDE_BOTH = "both"
GROUP_GLUTEAL = "gluteal"
GROUP_ABOVE_KNEE = "above_knee"
GROUP_ALL = "all"

# Quality flag codes (QualityFlag.code)
FLAG_PARTIAL_TOP = "partial_fov_top"  # cut by the superior end of the field of view: volume is partial
FLAG_PARTIAL_BOTTOM = "partial_fov_bottom"  # cut by the inferior end
FLAG_METAL = "metal"  # metal (implant) in or near the structure: HU values unreliable
FLAG_IMPLAUSIBLE_VOLUME = "implausible_volume"  # outside the plausible range for the patient's size
FLAG_NO_HEIGHT = "no_height"  # no PatientSize and none recorded: no height-adjusted values
FLAG_EMPTY = "not_found"  # the structure was not found on this side
FLAG_PARTIAL_COMMON_RANGE = "partial_common_range"  # comparison: compared over the range both scans cover only


@dataclass(frozen=True)
class QualityFlag:
    """Something a reader must see. ``structure`` is a label key or "" for the study."""

    code: str
    message: str
    structure: str = ""
    side: str = ""  # "left", "right", "both" or ""


@dataclass(frozen=True)
class StructureUncertainty:
    """How sure the model is of one structure on one side (pipeline.uncertainty).

    ``mean_entropy``: mean normalised voxel entropy (0..1) of the samples' mean softmax inside the
    structure; ``volume_cv_pct``: coefficient of variation of its volume across the samples (%);
    ``low_confidence``: either is above the bundle's calibrated threshold.
    """

    method: str  # "tta": test-time augmentation
    n_samples: int
    mean_entropy: float
    volume_cv_pct: float
    low_confidence: bool = False

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"StructureUncertainty.n_samples = {self.n_samples}: allowed >= 1")
        for name in ("mean_entropy", "volume_cv_pct"):
            v = getattr(self, name)
            if not (v >= 0.0 and v < float("inf")):
                raise ValueError(f"StructureUncertainty.{name} = {v!r}: allowed a finite number >= 0")

    def to_record(self) -> list:
        """Compact JSON form (results store): [method, n_samples, mean_entropy, volume_cv_pct, low]."""
        return [self.method, self.n_samples, round(self.mean_entropy, 6), round(self.volume_cv_pct, 4),
                bool(self.low_confidence)]

    @classmethod
    def from_record(cls, rec: list) -> "StructureUncertainty":
        return cls(str(rec[0]), int(rec[1]), float(rec[2]), float(rec[3]), bool(rec[4]))


@dataclass(frozen=True)
class StructureMeasurement:
    """One structure on one side ("left", "right") or both sides together ("both")."""

    label_id: int
    key: str
    name: str
    group: str
    side: str
    voxel_count: int
    volume_ml: float
    mean_hu: float
    std_hu: float
    mass_g: float
    fat_fraction: float  # fraction of voxels within -190..-30 HU inside the structure
    flags: tuple[str, ...] = ()  # QualityFlag codes that concern this structure and side
    near_metal_voxels: int = 0  # voxels within Measurements.metal_proximity_mm of metal (pipeline.measure)
    uncertainty: StructureUncertainty | None = None  # None: uncertainty off, or stored before it existed

    @property
    def is_partial(self) -> bool:
        return FLAG_PARTIAL_TOP in self.flags or FLAG_PARTIAL_BOTTOM in self.flags


@dataclass(frozen=True)
class GroupMeasurement:
    """Muscle totals of a group (gluteal, above_knee, all) on a side or both, as in the SMI paper.

    A group is reported only when the field of view covers its muscles (pipeline/groups.py);
    otherwise ``withheld_reason`` says which muscles are cut or absent and every value is None.
    ``includes_partial``: a member is cut by the field of view where its anatomy runs past the
    groups' region (e.g. the hamstrings at the knee), so the totals are of the part inside it.
    """

    group: str
    side: str
    structure_keys: tuple[str, ...]
    volume_ml: float | None  # None: withheld
    mass_g: float | None  # None: withheld
    volume_per_height2_cm3_m2: float | None  # volume / height²; None: no height or withheld
    smi_kg_m2: float | None  # mass (kg) / height² (m²); None: no height or withheld
    includes_partial: bool  # a member structure is cut by the field of view
    withheld_reason: str = ""  # "" = reported; else "not reported: <muscles> <why>"

    def __post_init__(self) -> None:
        values = (self.volume_ml, self.mass_g, self.volume_per_height2_cm3_m2, self.smi_kg_m2)
        if self.withheld_reason and any(v is not None for v in values):
            raise ValueError(
                f"GroupMeasurement {self.group}/{self.side} is withheld ({self.withheld_reason!r}) but carries "
                f"values {values}; a withheld group has none"
            )
        if not self.withheld_reason and (self.volume_ml is None or self.mass_g is None):
            raise ValueError(
                f"GroupMeasurement {self.group}/{self.side} has no volume or mass but no withheld_reason; "
                "a reported group has both"
            )

    @property
    def reported(self) -> bool:
        return not self.withheld_reason


@dataclass(frozen=True)
class SarcopeniaAssessment:
    """SMI of the configured group against the site's threshold for the patient's sex."""

    group: str
    smi_kg_m2: float
    threshold_kg_m2: float
    below_threshold: bool
    calibrated_for_ct: bool  # False: default AWGS 2014 DXA values, not calibrated for CT
    source: str  # where the threshold comes from


@dataclass(frozen=True)
class SarcopeniaNotAssessed:
    """Why the sarcopenia screen of the configured group was not assessed (group withheld), and
    which reported group's SMI was measured instead (no threshold applied unless the site
    configured one for that group: then :class:`SarcopeniaAssessment` is on that group)."""

    group: str  # the configured group
    reason: str  # "not assessed: the above knee group is not fully in the field of view"
    measured_group: str = ""  # the reported group named instead ("" when none is reported)
    measured_smi_kg_m2: float | None = None
    measured_threshold_applied: bool = False  # the site configured a threshold for measured_group


@dataclass(frozen=True)
class Measurements:
    """All measurements of one segmented study."""

    structures: tuple[StructureMeasurement, ...]
    groups: tuple[GroupMeasurement, ...]
    flags: tuple[QualityFlag, ...]
    height_m: float | None
    height_source: str  # "PatientSize", "recorded" or "" (unknown)
    sex: str
    density_formula: str  # how mass was derived from HU (for the report)
    sarcopenia: SarcopeniaAssessment | None = None
    voxel_volume_ml: float = 0.0
    sarcopenia_not_assessed: SarcopeniaNotAssessed | None = None  # the configured group was withheld
    metal_proximity_mm: float = 15.0  # the distance StructureMeasurement.near_metal_voxels counts within

    def structure(self, key: str, side: str) -> StructureMeasurement | None:
        for s in self.structures:
            if s.key == key and s.side == side:
                return s
        return None

    def group(self, group: str, side: str = SIDE_BOTH) -> GroupMeasurement | None:
        for g in self.groups:
            if g.group == group and g.side == side:
                return g
        return None


# ---------------------------------------------------------------------------
# Longitudinal comparison with the patient's prior study (pipeline/compare.py produces it).


@dataclass(frozen=True)
class StructureProfile:
    """Cross-sectional area of one structure on one side along the leg.

    ``z_mm[i]`` is the slice position relative to the anatomical landmark (positive = superior),
    ``area_mm2[i]`` the structure's area in that slice, ``mean_hu[i]`` its mean HU there,
    ``fat_voxels[i]``/``voxels[i]`` its fat and total voxel counts; ``slice_mm`` the slice spacing.
    """

    key: str
    side: str
    z_mm: tuple[float, ...]
    area_mm2: tuple[float, ...]
    mean_hu: tuple[float, ...]
    voxels: tuple[int, ...]
    fat_voxels: tuple[int, ...]
    slice_mm: float


@dataclass(frozen=True)
class BoneProfile:
    """Bone area along patient z on one side of the body, from the image alone (no model).

    ``z_mm[i]`` is the absolute patient z (LPS, mm) of slice i's centre, ascending; ``area_mm2[i]`` the
    area of the voxels in the bone window (pipeline.profiles.BONE_HU <= HU <= the metal threshold) on
    that side of the body midline; ``metal[i]`` True when that slice holds metal on that side (its
    area is then not used). pipeline.boneshift registers two of them to align two scans along z when
    the femoral-head landmark is missing.
    """

    z_mm: tuple[float, ...]
    area_mm2: tuple[float, ...]
    metal: tuple[bool, ...]
    slice_mm: float


@dataclass(frozen=True)
class AnatomicalProfiles:
    """Per structure and side profiles of one study, aligned on a bone landmark per side.

    ``landmark_z_mm[side]`` is the patient z (LPS, mm) of the landmark (the top of the femoral head)
    on that side, or None when it is not in the field of view. ``fov_z_mm[side]`` (the covered range,
    lo, hi), ``metal_z_mm[side]`` and the z of that side's structure profiles are relative to the
    landmark when there is one; without one they are absolute patient z (relative to z = 0 of the
    patient coordinates) when ``bone[side]`` is set - then only the bone-profile registration can place
    them on the prior's axis - and None/absent when it is not (profiles stored before the bone
    profiles existed: that side cannot be compared). ``landmark_reliable[side]`` is False when that side
    has no landmark, or one used although metal lies near it on both sides (no entry, in profiles
    stored before it existed: reliable).
    """

    landmark: str
    landmark_z_mm: dict[str, float | None]
    fov_z_mm: dict[str, tuple[float, float] | None]
    profiles: tuple[StructureProfile, ...]
    metal_z_mm: dict[str, tuple[float, float] | None]  # z range of metal on each side (relative: see above)
    bone: dict[str, BoneProfile | None] = field(default_factory=dict)  # per side; {} in old stored profiles
    landmark_reliable: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class StructureChange:
    """Change of one structure on one side between the prior and the current study.

    Values are over the common range of the leg both scans cover (``common_range_mm`` relative to
    the landmark), not over each scan's whole field of view. ``compared`` is False (and the values
    None) when a fair comparison is impossible; ``reason`` says why (partial, metal, no landmark).
    """

    key: str
    name: str
    group: str
    side: str
    compared: bool
    reason: str
    common_range_mm: tuple[float, float] | None
    prior_volume_ml: float | None
    current_volume_ml: float | None
    change_ml: float | None
    change_ratio: float | None  # change / prior volume
    change_per_height2_cm3_m2: float | None
    prior_mass_g: float | None
    current_mass_g: float | None
    change_mass_g: float | None
    prior_mean_hu: float | None
    current_mean_hu: float | None
    change_mean_hu: float | None
    prior_fat_fraction: float | None
    current_fat_fraction: float | None
    change_fat_fraction: float | None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupChange:
    """Change of a muscle group's total on a side (or both) between the prior and the current study.

    Compared only when the group is reported in both studies (pipeline.measure withholds a group
    the field of view does not cover); the values are the sums of its members' changes over the
    common range (pipeline.compare). ``compared`` False: values None and ``reason`` says why.
    """

    group: str
    side: str
    compared: bool
    reason: str
    structure_keys: tuple[str, ...]
    prior_volume_ml: float | None
    current_volume_ml: float | None
    change_ml: float | None
    change_ratio: float | None  # change / prior volume
    change_per_height2_cm3_m2: float | None
    change_mass_g: float | None  # None also when metal withholds a member's mass change


@dataclass(frozen=True)
class Comparison:
    """The current study against the patient's prior study."""

    prior_study_uid: str
    prior_study_date: str
    current_study_date: str
    interval_days: int | None
    landmark: str
    method: str  # one sentence a reader can check: how the two scans were aligned and cut
    changes: tuple[StructureChange, ...]
    operated_side: str = ""  # side with metal in either scan ("left"/"right"/""), shown beside the other
    height_m: float | None = None
    # per side, what common_range_mm's z is measured from: "from the landmark", or the current scan's
    # patient z when bone profile registration aligned that side; {} in comparisons stored before it
    axis_text: dict[str, str] = field(default_factory=dict)

    def change(self, key: str, side: str) -> StructureChange | None:
        for c in self.changes:
            if c.key == key and c.side == side:
                return c
        return None


@dataclass(frozen=True)
class PriorSearch:
    """Where the node looked for a prior study and what it found (for the report when none)."""

    found: bool
    prior_study_uid: str = ""
    looked_in: tuple[str, ...] = ()  # e.g. ("results database", "PACS query/retrieve (PACS@10.0.0.5:104)")
    message: str = ""
