"""Per-structure segmentation uncertainty from test-time augmentation (TTA).

The demonstration bundle was trained without dropout (``network.dropout_rate = 0.0`` in its
metadata), so Monte Carlo dropout would draw the same network every time; the samples here are
test-time augmentations of the input instead (Hiasa et al., "Automated muscle segmentation from
clinical CT using Bayesian U-Net", IEEE TMI 2020, use the same summaries with MC dropout):

====  ======================================================================================
 0    the input as it is
 1    its left-right mirror (the model's labels have no side: the side is split at the midline
      afterwards, so the mirror needs no label swap); the node's ``mirror`` pass is this sample
 2    the input shifted by a quarter of the patch on every axis (another sliding-window grid)
 3    mirror and shift
====  ======================================================================================

Summaries per structure and side (and both sides) of the final label map:

* ``mean_entropy``: the mean over the structure's voxels of the voxel entropy of the samples'
  mean softmax, normalised by log(C): 0 = every sample certain of one class, 1 = uniform over C.
  The entropy is computed on the model grid and carried to the volume's grid by nearest neighbour
  (quantised to 1/255), like the label map's own restore.
* ``volume_cv_pct``: the coefficient of variation (population SD / mean, %) of the structure's
  volume across the samples: per sample the voxels of its class after the volume calibration,
  argmax and side split on the model grid (no clean-up: islands count).

A structure is *low confidence* when either is above the bundle's threshold
(``metadata.json`` ``"uncertainty"``), chosen on labelled calibration phantoms
(``thighnode evaluate --uncertainty``, modelkit/uncertainty_eval.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline.types import (
    SIDE_BOTH,
    SIDE_LEFT,
    SIDE_NAMES,
    SIDE_RIGHT,
    Segmentation,
    StructureMeasurement,
    StructureUncertainty,
)

#: ``[model] uncertainty`` values.
UNCERTAINTY_OFF = "off"
UNCERTAINTY_TTA = "tta"
UNCERTAINTY_METHODS = (UNCERTAINTY_OFF, UNCERTAINTY_TTA)
#: The augmentations, in the order samples are drawn (see the module docstring).
TTA_SAMPLES = ("identity", "mirror", "shift", "mirror+shift")
MAX_TTA_SAMPLES = len(TTA_SAMPLES)
_N_SIDE_CODES = 3  # SIDE_NONE, SIDE_RIGHT, SIDE_LEFT (as pipeline.measure bins them)


@dataclass(frozen=True)
class UncertaintyThresholds:
    """Above either value a structure is flagged low confidence (bundle metadata ``"uncertainty"``)."""

    mean_entropy: float
    volume_cv_pct: float
    how_chosen: str = ""

    def __post_init__(self) -> None:
        for name in ("mean_entropy", "volume_cv_pct"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"UncertaintyThresholds.{name} = {v!r}: allowed a finite number >= 0")

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> "UncertaintyThresholds | None":
        """From a bundle's metadata.json (``"uncertainty": {"mean_entropy_threshold": ..,
        "volume_cv_pct_threshold": .., "how_chosen": ".."}``); None when it has none."""
        u = metadata.get("uncertainty")
        if not u:
            return None
        try:
            return cls(float(u["mean_entropy_threshold"]), float(u["volume_cv_pct_threshold"]),
                       str(u.get("how_chosen", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bundle metadata 'uncertainty' = {u!r}: needs mean_entropy_threshold and "
                             f"volume_cv_pct_threshold, numbers >= 0 ({exc})") from exc

    def is_low_confidence(self, mean_entropy: float, volume_cv_pct: float) -> bool:
        return mean_entropy > self.mean_entropy or volume_cv_pct > self.volume_cv_pct


@dataclass(frozen=True)
class SegmentationUncertainty:
    """What the TTA samples say about one segmentation.

    ``structures`` maps (label id, side "right" / "left" / "both") to its summary (structures absent
    from the label map have none); ``entropy_map_u8`` is the normalised voxel entropy x 255 on the
    volume's grid (same shape and axis order as the label map), for the report's overlay.
    """

    method: str
    n_samples: int
    structures: Mapping[tuple[int, str], StructureUncertainty]
    entropy_map_u8: np.ndarray = field(repr=False)
    thresholds: UncertaintyThresholds | None = None

    def for_structure(self, label_id: int, side: str) -> StructureUncertainty | None:
        return self.structures.get((int(label_id), side))


def voxel_entropy(probs: torch.Tensor | np.ndarray, *, normalise: bool = True) -> np.ndarray:
    """Shannon entropy over axis 0 of class probabilities ``(C, ...)``, float32; divided by log(C)
    (range 0..1) unless ``normalise`` is False. 0 log 0 counts as 0."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    if p.ndim < 1 or p.shape[0] < 2:
        raise ValueError(f"probabilities need a class axis of at least 2; shape is {tuple(p.shape)}")
    out = torch.empty(p.shape[1:], dtype=torch.float32)
    flat_p, flat_o = p.reshape(p.shape[0], -1), out.reshape(-1)
    step = 1 << 20
    for a in range(0, flat_o.numel(), step):
        q = flat_p[:, a:a + step].clamp(0.0, 1.0)
        flat_o[a:a + step] = -torch.xlogy(q, q).sum(dim=0)
    if normalise:
        out /= math.log(p.shape[0])
    return out.clamp_(min=0.0).numpy()


def bin_counts(label_map: np.ndarray, side_map: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxels per bin ``label * 3 + side`` (label 0..n_labels)."""
    bins = label_map.astype(np.int64) * _N_SIDE_CODES + side_map.astype(np.int64)
    return np.bincount(bins.ravel(), minlength=(n_labels + 1) * _N_SIDE_CODES)[: (n_labels + 1) * _N_SIDE_CODES]


def volume_cv_pct(volumes: Sequence[float]) -> float:
    """Population coefficient of variation of ``volumes`` in % (0 when all are equal or all zero)."""
    v = np.asarray(volumes, dtype=np.float64)
    if v.size == 0:
        raise ValueError("volume_cv_pct needs at least one sample")
    mean = float(v.mean())
    return 0.0 if mean <= 0 else float(100.0 * v.std() / mean)


def summarise(
    entropy: np.ndarray,
    label_map: np.ndarray,
    side_map: np.ndarray,
    sample_counts: Sequence[np.ndarray],
    n_labels: int,
    *,
    method: str = UNCERTAINTY_TTA,
    thresholds: UncertaintyThresholds | None = None,
    entropy_scale: float = 1.0,
    slab: int = 16,
) -> dict[tuple[int, str], StructureUncertainty]:
    """Per (label id, side) summaries. ``entropy`` (times ``entropy_scale``: 1/255 for
    :func:`quantise_entropy`'s uint8), ``label_map`` and ``side_map`` share one grid (the volume's);
    ``sample_counts`` holds per sample the voxels per bin (:func:`bin_counts` of its own label map,
    on any grid: only their ratios count). Structures with no voxel in ``label_map`` get no summary.
    The sums run ``slab`` slices at a time, so a full-resolution CT needs no float copy of itself."""
    if entropy.shape != label_map.shape or label_map.shape != side_map.shape:
        raise ValueError(f"entropy {entropy.shape}, label map {label_map.shape} and side map {side_map.shape} "
                         "must have one shape")
    if not sample_counts:
        raise ValueError("summarise needs at least one sample")
    n_bins = (n_labels + 1) * _N_SIDE_CODES
    count = np.zeros(n_bins, dtype=np.int64)
    ent_sum = np.zeros(n_bins, dtype=np.float64)
    for k in range(0, label_map.shape[0] if label_map.ndim else 1, max(1, slab)):
        bins = (label_map[k:k + slab].astype(np.int64) * _N_SIDE_CODES + side_map[k:k + slab]).ravel()
        count += np.bincount(bins, minlength=n_bins)[:n_bins]
        ent_sum += np.bincount(bins, weights=entropy[k:k + slab].ravel().astype(np.float64), minlength=n_bins)[:n_bins]
    ent_sum *= float(entropy_scale)
    samples = np.stack([np.asarray(c, dtype=np.float64)[:n_bins] for c in sample_counts])
    out: dict[tuple[int, str], StructureUncertainty] = {}
    groups = [(SIDE_NAMES[SIDE_RIGHT], [SIDE_RIGHT]), (SIDE_NAMES[SIDE_LEFT], [SIDE_LEFT]),
              (SIDE_BOTH, list(range(_N_SIDE_CODES)))]
    for lid in range(1, n_labels + 1):
        for side, codes in groups:
            b = [lid * _N_SIDE_CODES + s for s in codes]
            n = int(count[b].sum())
            if n == 0:
                continue
            mean_entropy = min(1.0, max(0.0, float(ent_sum[b].sum() / n)))
            cv = volume_cv_pct(samples[:, b].sum(axis=1))
            low = thresholds.is_low_confidence(mean_entropy, cv) if thresholds is not None else False
            out[(lid, side)] = StructureUncertainty(method=method, n_samples=len(sample_counts),
                                                    mean_entropy=mean_entropy, volume_cv_pct=cv,
                                                    low_confidence=low)
    return out


def quantise_entropy(entropy: np.ndarray) -> np.ndarray:
    """Normalised entropy (0..1) as uint8 0..255 (for storage beside the label map and the overlay)."""
    return np.clip(np.rint(np.asarray(entropy, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def with_uncertainty(s: StructureMeasurement, seg: Segmentation) -> StructureMeasurement:
    """``s`` with the segmentation's summary for its structure and side, if it has one."""
    if seg.uncertainty is None:
        return s
    u = seg.uncertainty.for_structure(s.label_id, s.side)
    return s if u is None else dataclasses.replace(s, uncertainty=u)
