"""Training augmentation for transfer from phantoms to real CT: tissue contrast, bias field and blur.

The phantoms give each muscle its own mean HU (``Subject.muscle_hu``), clean edges and a flat
field: a network can learn those as cues, and real CT has none of them. :class:`RandTissueContrastd`
(after SynthSeg, Billot et al., Med Image Anal 2023: intensities drawn per structure from the label
map so that only shape and context are left to learn) changes, per training patch:

* **per-structure HU offset**: every class (background included) gets its own offset drawn from
  N(0, ``structure_sd_hu``), spread over the patch with the soft labels (partial-volume voxels take
  the mixture), so two muscles can no longer be told apart by their mean HU;
* **global contrast**: an HU offset N(0, ``global_sd_hu``) and a scale U(1 - s, 1 + s) about soft
  tissue (40 HU), like scanner calibration, kVp and contrast medium do;
* **bias field**: a smooth additive HU field (a random 4x4x4 grid upsampled trilinearly) of
  amplitude up to ``bias_hu`` (beam hardening, cupping, patient size);
* **blur**: a Gaussian of sigma U(0, ``blur_max_vox``) voxels per axis (reconstruction kernels,
  slice thickness, the partial volume of coarser series);
* **background clutter** (with probability ``clutter_prob`` per patch): smooth blobs of soft-tissue
  HU (-20..100) painted into unlabelled soft tissue within a few voxels of the labelled structures,
  as bowel, vessels, lymph nodes and unlabelled muscles are in real CT: a blob of muscle density is
  not by itself a muscle of the table;
* **fat infiltration** (with probability ``fat_prob`` per patch): each structure gets its own share
  U(0, ``fat_fraction_max``) of its soft-tissue voxels turned into small fat blobs (-150..-20 HU), the
  marbling of the aged, atrophic muscle of hip-fracture patients; the label stays the muscle's (as
  references label it), bone (above the window) is left alone.

The image arrives windowed and gamma-corrected (pipeline.preprocess.window_gamma: clip to
[lo, hi] HU, scale to [0, 1], power gamma). The transform undoes the gamma, works in HU-linear
window units (1 = hi - lo HU), clips to the window and applies the gamma again, so what the network
sees is exactly what a CT with those HU would give after preprocessing. Voxels the window clipped
(fat, air, bone) are moved a margin beyond it first (:data:`CLIPPED_MARGIN_HU`), so bone stays white.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

SOFT_TISSUE_HU = 40.0
#: Voxels the window clipped are put this far below / above it before the changes (fat lies near
#: -100 HU, cortical bone far above 164): an offset or contrast change must not turn them grey.
CLIPPED_MARGIN_HU = (50.0, 300.0)


@dataclass(frozen=True)
class TissueContrastSettings:
    """How much :class:`RandTissueContrastd` changes; ``prob`` 0 turns it off."""

    prob: float = 0.0
    structure_sd_hu: float = 12.0
    global_sd_hu: float = 10.0
    contrast_fraction: float = 0.15
    bias_hu: float = 20.0
    blur_max_vox: float = 0.8
    clutter_prob: float = 0.0
    fat_prob: float = 0.0
    fat_fraction_max: float = 0.2

    def __post_init__(self) -> None:
        for name in ("prob", "clutter_prob", "fat_prob", "fat_fraction_max"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"contrast augmentation {name} is {getattr(self, name)!r}; allowed: 0 .. 1")
        for name in ("structure_sd_hu", "global_sd_hu", "contrast_fraction", "bias_hu", "blur_max_vox"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"contrast augmentation {name} is {value!r}; allowed: a number >= 0")
        if self.contrast_fraction >= 1.0:
            raise ValueError(f"contrast augmentation contrast_fraction is {self.contrast_fraction!r}; allowed: below 1")


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """Per-structure contrast, bias field and blur on ``image`` (C=1, D, H, W), using ``soft``
    (C classes, D, H, W; any non-negative weights, uint8 0..255 or float) for the structures."""

    def __init__(self, image_key: str, soft_key: str, settings: TissueContrastSettings,
                 window_hu: tuple[float, float], gamma: float) -> None:
        MapTransform.__init__(self, keys=(image_key,))
        RandomizableTransform.__init__(self, prob=settings.prob)
        self.image_key, self.soft_key = image_key, soft_key
        self.settings = settings
        self.lo_hu, self.hi_hu = float(window_hu[0]), float(window_hu[1])
        self.gamma = float(gamma)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image = np.asarray(d[self.image_key], dtype=np.float32)
        soft = np.asarray(d[self.soft_key], dtype=np.float32)
        out = self.apply(image, soft)
        d[self.image_key] = torch.as_tensor(out) if isinstance(d[self.image_key], torch.Tensor) else out
        return d

    def apply(self, image: np.ndarray, soft: np.ndarray) -> np.ndarray:
        """The augmented image; draws from this transform's random state."""
        s, rng = self.settings, self.R
        span = self.hi_hu - self.lo_hu
        x = np.power(np.clip(image[0], 0.0, 1.0), 1.0 / self.gamma)
        hu = x * span + self.lo_hu
        # the window clipped them: what lay above it (bone, contrast) or below (fat, air) stays there
        hu[x >= 1.0 - 1e-4] = self.hi_hu + CLIPPED_MARGIN_HU[1]
        hu[x <= 1e-4] = self.lo_hu - CLIPPED_MARGIN_HU[0]
        weights = soft / np.maximum(soft.sum(0, keepdims=True), 1e-6)
        if s.clutter_prob > 0 and rng.uniform() < s.clutter_prob:
            _paint_clutter(rng, hu, weights[0])
        if s.fat_prob > 0 and rng.uniform() < s.fat_prob:
            _infiltrate_fat(rng, hu, weights, s.fat_fraction_max)
        offsets = rng.normal(0.0, s.structure_sd_hu, size=soft.shape[0]).astype(np.float32)
        hu = hu + np.tensordot(offsets, weights, axes=(0, 0))
        scale = rng.uniform(1.0 - s.contrast_fraction, 1.0 + s.contrast_fraction)
        hu = SOFT_TISSUE_HU + (hu - SOFT_TISSUE_HU) * scale + rng.normal(0.0, s.global_sd_hu)
        if s.bias_hu > 0:
            hu = hu + _smooth_field(rng, hu.shape, s.bias_hu)
        sigma = rng.uniform(0.0, s.blur_max_vox, size=3)
        if sigma.max() > 0.1:
            hu = ndimage.gaussian_filter(hu, sigma=tuple(float(x) for x in sigma), mode="nearest")
        x = np.clip((hu - self.lo_hu) / span, 0.0, 1.0)
        return np.power(x, self.gamma, dtype=np.float32)[None].astype(np.float32)


def _smooth_field(rng: np.random.RandomState, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth field in [-amplitude, amplitude]: a 4x4x4 uniform grid, upsampled trilinearly."""
    grid = torch.as_tensor(rng.uniform(-amplitude, amplitude, size=(1, 1, 4, 4, 4)), dtype=torch.float32)
    field = torch.nn.functional.interpolate(grid, size=tuple(shape), mode="trilinear", align_corners=True)
    return field[0, 0].numpy()


def _paint_clutter(rng: np.random.RandomState, hu: np.ndarray, background: np.ndarray) -> None:
    """Soft-tissue blobs in unlabelled soft tissue near the structures (in place)."""
    near = ndimage.binary_dilation(background < 0.5, iterations=6)
    where = near & (background > 0.99) & (hu < 150.0)
    if not where.any():
        return
    shape = hu.shape
    blob = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0)
    blob /= max(float(blob.std()), 1e-6)
    level = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=3.0)
    level /= max(float(level.std()), 1e-6)
    paint = where & (blob > rng.uniform(0.8, 1.4))
    hu[paint] = (40.0 + 30.0 * level[paint]).clip(-20.0, 100.0)


def _infiltrate_fat(rng: np.random.RandomState, hu: np.ndarray, weights: np.ndarray, fraction_max: float) -> None:
    """Fat blobs in each structure's soft tissue, a share U(0, fraction_max) per structure (in place)."""
    owner = np.argmax(weights, axis=0)
    tissue = (weights[0] < 0.5) & (hu > -30.0) & (hu < 150.0)  # labelled soft tissue; bone and fat excluded
    if not tissue.any():
        return
    shape = hu.shape
    blob = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.0)
    level = rng.normal(-90.0, 30.0, size=shape).astype(np.float32)
    shares = rng.uniform(0.0, fraction_max, size=weights.shape[0])
    paint = np.zeros(shape, dtype=bool)
    for c in np.unique(owner[tissue]):
        inside = tissue & (owner == c)
        if shares[c] <= 0:
            continue
        cut = np.quantile(blob[inside], 1.0 - shares[c])
        paint |= inside & (blob > cut)
    hu[paint] = level[paint].clip(-150.0, -20.0)


def elastic_deformation(keys: tuple[str, str], modes: tuple[str, str], prob: float,
                        sigma_vox: tuple[float, float], magnitude: tuple[float, float]) -> list:
    """MONAI's Rand3DElasticd on image and labels (empty list when ``prob`` is 0): the same random field
    moves both, so the labels stay on their structures."""
    if prob <= 0:
        return []
    from monai.transforms import Rand3DElasticd

    return [Rand3DElasticd(keys=keys, sigma_range=sigma_vox, magnitude_range=magnitude, prob=prob, mode=modes,
                           padding_mode="border")]
