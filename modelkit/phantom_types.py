"""What a phantom is: its parameters (:class:`PhantomParams`), the result (:class:`Phantom`: HU volume,
exact label map, LPS affine) and its ground truth per structure and side.

Generation: :mod:`modelkit.phantom`; writers: :mod:`modelkit.phantom_io`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.labels import LabelTable, load_label_table

SIDES = ("left", "right")
SEXES = ("F", "M")
IMPLANT_SIDES = ("left", "right", "both")
IMPLANT_KINDS = ("total_hip", "hemi", "nail", "screws", "dhs")


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

    ``implant`` (None, "left", "right" or "both") puts the metal of hip surgery on that side
    (both sides get the same kind); ``implant_kind`` is one of :data:`IMPLANT_KINDS`: total hip
    prosthesis, hemiarthroplasty, cephalomedullary nail, three cannulated screws or dynamic hip
    screw (geometry: :mod:`modelkit.phantom_implants`).
    """

    seed: int
    sex: str = "F"
    height_m: float = 1.65
    size: float = 1.0
    fat_fraction: float = 0.25
    atrophy: Mapping[str, float] = field(default_factory=dict)
    implant: str | None = None
    implant_kind: str = "total_hip"
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
        if self.implant is not None and self.implant not in IMPLANT_SIDES:
            raise PhantomError(f"PhantomParams.implant is {self.implant!r}; allowed: None, {', '.join(map(repr, IMPLANT_SIDES))}")
        if self.implant_kind not in IMPLANT_KINDS:
            raise PhantomError(
                f"PhantomParams.implant_kind is {self.implant_kind!r}; allowed: {', '.join(map(repr, IMPLANT_KINDS))}"
            )
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
        return left_columns(self.affine_lps, self.hu.shape[2], self.midline_x_mm)

    def ground_truth(self, labels: LabelTable | None = None) -> dict:
        return ground_truth(self, labels)


def left_columns(affine_lps: np.ndarray, n_cols: int, midline_x_mm: float) -> np.ndarray:
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
