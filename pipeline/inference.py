"""Sliding-window segmentation of a Volume with a loaded bundle.

A :class:`Segmenter` wraps one loaded :class:`~pipeline.bundle.Bundle`; build it once per
process and share it: :meth:`Segmenter.segment` is thread-safe (one inference at a
time under a lock; the network is never modified).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Iterator

import numpy as np
import torch

from pipeline.bundle import PRECISIONS, Bundle
from pipeline.errors import SegmentationError
from pipeline.labels import FEMUR_KEY
from pipeline.postprocess import keep_largest_components, split_sides
from pipeline.preprocess import PreprocessPlan, prepare, restore_labels, restore_probabilities
from pipeline.types import Segmentation, Volume
from pipeline.uncertainty import (
    MAX_TTA_SAMPLES,
    TTA_SAMPLES,
    UNCERTAINTY_METHODS,
    UNCERTAINTY_OFF,
    UNCERTAINTY_TTA,
    SegmentationUncertainty,
    UncertaintyThresholds,
    bin_counts,
    quantise_entropy,
    summarise,
    voxel_entropy,
)

logger = logging.getLogger(__name__)


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SegmentationError(f"device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SegmentationError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def default_cpu_threads() -> int:
    """Threads for CPU inference: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cpu_supports_bf16() -> bool:
    """The CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX, as oneDNN reports it): without it bf16
    autocast emulates the arithmetic and is slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return False


def autocast_dtype(device: torch.device, precision: str = "fp32") -> torch.dtype | None:
    """The autocast dtype of the network on ``device`` for ``precision`` (pipeline.bundle.PRECISIONS); None =
    float32. CUDA keeps its float16 AMP for "fp32" (as before this setting) and uses bfloat16 for "bf16" where
    the GPU has it; the CPU uses bfloat16 only for "bf16" on a CPU with native bfloat16 (cpu_supports_bf16)."""
    if precision not in PRECISIONS:
        raise SegmentationError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" and torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" and device.type == "cpu" and cpu_supports_bf16() else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _window_probs(network: torch.nn.Module, inp: torch.Tensor, roi_size: tuple[int, int, int], *,
                  sw_batch_size: int, overlap: float, mode: str) -> torch.Tensor:
    """Softmax ``(C, D, H, W)`` of one ``(1, 1, D, H, W)`` input by MONAI ``sliding_window_inference``."""
    from monai.inferers import sliding_window_inference

    logits = sliding_window_inference(
        inp,
        roi_size=tuple(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=network,
        overlap=overlap,
        mode=mode,
        padding_mode="constant",
        cval=0.0,
    )
    return torch.softmax(logits.float(), dim=1)[0]


def predict_scores(
    network: torch.nn.Module,
    image: np.ndarray,
    roi_size: tuple[int, int, int],
    device: torch.device,
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    mode: str = "gaussian",
    mirror: bool = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """Softmax class probabilities ``(C, D, H, W)`` (float32, CPU) for a ``(1, D, H, W)`` model input.

    MONAI ``sliding_window_inference`` under ``torch.inference_mode``, the network under the autocast
    :func:`autocast_dtype` gives for ``precision``. ``mirror``: the mean of the probabilities of the
    input and of its mirror along the last axis (x).
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    kw = dict(sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)
    with torch.inference_mode(), _autocast(device, autocast_dtype(device, precision)):
        probs = _window_probs(network, x, roi_size, **kw)
        if mirror:
            probs += torch.flip(_window_probs(network, torch.flip(x, dims=(-1,)), roi_size, **kw), dims=(-1,))
            probs *= 0.5
    return probs.cpu()


def predict_samples(
    network: torch.nn.Module,
    image: np.ndarray,
    roi_size: tuple[int, int, int],
    device: torch.device,
    n_samples: int,
    *,
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    mode: str = "gaussian",
    precision: str = "fp32",
) -> Iterator[torch.Tensor]:
    """Softmax ``(C, D, H, W)`` (float32, CPU) of each test-time augmentation in
    :data:`pipeline.uncertainty.TTA_SAMPLES` order (identity, mirror, shift, mirror + shift), mapped
    back onto the input's grid. The shift pads a quarter patch of zeros (the window's own padding
    value) before every axis, so the sliding-window grid falls elsewhere. ``precision``: as
    :func:`predict_scores`, for every sample."""
    if not 1 <= n_samples <= MAX_TTA_SAMPLES:
        raise SegmentationError(f"uncertainty samples = {n_samples}: allowed 1..{MAX_TTA_SAMPLES}")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    kw = dict(sw_batch_size=sw_batch_size, overlap=overlap, mode=mode)
    pad = [max(1, int(r) // 4) for r in roi_size]
    dtype = autocast_dtype(device, precision)
    for kind in TTA_SAMPLES[:n_samples]:
        with torch.inference_mode(), _autocast(device, dtype):  # not held across the yield
            inp = torch.flip(x, dims=(-1,)) if "mirror" in kind else x
            if "shift" in kind:
                inp = torch.nn.functional.pad(inp, (pad[2], 0, pad[1], 0, pad[0], 0), value=0.0)
            probs = _window_probs(network, inp, roi_size, **kw)
            if "shift" in kind:
                probs = probs[:, pad[0]:, pad[1]:, pad[2]:]
            if "mirror" in kind:
                probs = torch.flip(probs, dims=(-1,))
            probs = probs.contiguous().cpu()
        yield probs


def scale_classes(probs: torch.Tensor, weights, *, in_place: bool = False) -> torch.Tensor:
    """``probs`` (C, ...) times a per-class factor (the bundle's volume calibration): the one place
    both the Segmenter and the calibration fit (modelkit.calibration) apply the factors.
    ``in_place``: into ``probs`` itself (the same products, no second score volume)."""
    factors = torch.tensor(weights, dtype=probs.dtype)[(slice(None),) + (None,) * (probs.dim() - 1)]
    if in_place:
        with torch.inference_mode(probs.is_inference()):
            return probs.mul_(factors)
    return probs * factors


#: Voxels at or above this HU are metal (implants), never a structure: the segmentation leaves them
#: unlabelled, so bone labels exclude the metal. The measurement's default metal threshold.
METAL_EXCLUDE_HU = 2000.0


def release_freed_memory() -> bool:
    """Hand the heap pages freed by the segment stage back to the operating system (glibc
    ``malloc_trim``: the sliding window's threads leave hundreds of MB of freed blocks in their malloc
    arenas, which would stay in the node's resident memory through the output stages). False where
    the C library has no ``malloc_trim`` (musl, macOS): nothing to do there."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _exclude_metal(label_map: np.ndarray, hu: np.ndarray, threshold_hu: float, slab: int = 32) -> None:
    """Background where ``hu >= threshold_hu`` (in place, a slab of slices at a time)."""
    for k in range(0, hu.shape[0], slab):
        metal = hu[k:k + slab] >= threshold_hu
        if metal.any():
            label_map[k:k + slab][metal] = 0


class Segmenter:
    """Segments volumes with one bundle. Thread-safe; load once and share.

    ``metal_exclude_hu``: voxels at or above it are set to background before the clean-up (None: off).
    ``precision``: "fp32" or "bf16" (None: the bundle's sliding_window.precision), for the label map's pass
    and every uncertainty sample alike (:func:`autocast_dtype`: bf16 only where the device has it).
    ``uncertainty``: ``"tta"`` also draws ``uncertainty_samples`` test-time augmentations
    (pipeline.uncertainty) and attaches their per-structure summaries to the segmentation; the label
    map stays the one ``mirror`` gives (the mirror pass is the second sample), so the reported
    volumes do not depend on this setting.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        num_threads: int | None = None,
        keep_largest: bool = True,
        mirror: bool | None = None,
        metal_exclude_hu: float | None = METAL_EXCLUDE_HU,
        uncertainty: str = UNCERTAINTY_OFF,
        uncertainty_samples: int = 2,
        precision: str | None = None,
    ) -> None:
        if uncertainty not in UNCERTAINTY_METHODS:
            raise SegmentationError(f"uncertainty = {uncertainty!r}: allowed {', '.join(UNCERTAINTY_METHODS)}")
        if not 2 <= int(uncertainty_samples) <= MAX_TTA_SAMPLES:
            raise SegmentationError(f"uncertainty_samples = {uncertainty_samples}: allowed 2..{MAX_TTA_SAMPLES}")
        try:
            self._thresholds = UncertaintyThresholds.from_metadata(bundle.metadata or {})
        except ValueError as exc:
            raise SegmentationError(f"bundle {bundle.name} {bundle.version}: {exc}") from exc
        self._uncertainty = uncertainty
        self._uncertainty_samples = int(uncertainty_samples)
        self._bundle = bundle
        self._metal_exclude_hu = metal_exclude_hu
        self._device = select_device(device)
        self._sw_batch_size = int(sw_batch_size if sw_batch_size is not None else bundle.sliding_window.sw_batch_size)
        self._overlap = float(overlap if overlap is not None else bundle.sliding_window.overlap)
        self._mode = bundle.sliding_window.mode
        self._mirror = bool(mirror if mirror is not None else bundle.sliding_window.mirror)
        self._precision = precision if precision is not None else bundle.sliding_window.precision
        autocast_dtype(self._device, self._precision)  # refuses an unknown name now, not at the first study
        self._num_threads = num_threads if num_threads is not None else default_cpu_threads()
        self._keep_largest = keep_largest
        self._lock = threading.Lock()
        self._network = bundle.network.to(self._device).eval()
        femur = [l.id for l in bundle.labels.labels if l.key == FEMUR_KEY]
        self._femur_id = femur[0] if femur else None

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    def describe(self) -> str:
        """One line with the settings that change the reported numbers (logged by the node at start)."""
        grid = " x ".join(f"{s:g}" for s in self._bundle.preprocess_settings.spacing_mm)
        return (f"device {self._device.type}, model grid {grid} mm, overlap {self._overlap:g} {self._mode}, "
                f"sw_batch_size {self._sw_batch_size}, mirror {'on' if self._mirror else 'off'}, "
                f"precision {self._precision} ({self._arithmetic()}), "
                f"uncertainty {self._uncertainty_label()}, "
                f"volume calibration {'on' if self._bundle.class_weights is not None else 'off'}")

    def _arithmetic(self) -> str:
        dtype = autocast_dtype(self._device, self._precision)
        return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"

    def _uncertainty_label(self) -> str:
        if self._uncertainty == UNCERTAINTY_OFF:
            return "off"
        thr = "no threshold" if self._thresholds is None else (
            f"low confidence above entropy {self._thresholds.mean_entropy:g} or volume CV "
            f"{self._thresholds.volume_cv_pct:g} %")
        return f"tta x{self._uncertainty_samples} ({thr})"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def uncertainty_thresholds(self) -> UncertaintyThresholds | None:
        return self._thresholds

    def predict(self, volume: Volume) -> tuple[torch.Tensor, PreprocessPlan]:
        """Model-grid probabilities and the plan (no restore, no post-processing)."""
        image, plan = prepare(volume.hu, volume.affine_lps, self._bundle.preprocess_settings)
        with self._lock:
            if self._device.type == "cpu":
                torch.set_num_threads(self._num_threads)
            probs = predict_scores(
                self._network,
                image,
                self._bundle.network_settings.img_size,
                self._device,
                sw_batch_size=self._sw_batch_size,
                overlap=self._overlap,
                mode=self._mode,
                mirror=self._mirror,
                precision=self._precision,
            )
        return probs, plan

    def predict_tta(self, volume: Volume) -> tuple[torch.Tensor, PreprocessPlan, np.ndarray, list[np.ndarray]]:
        """Model-grid probabilities for the label map (sample 0, or the mean of samples 0 and 1 when
        ``mirror`` is on: what :meth:`predict` gives), the plan, the normalised voxel entropy of the
        mean over all samples, and per sample its voxels per (label, side) bin.

        Two score volumes at most are held between samples: sample 0 (the label map's) and the sum,
        which sample 1 is added into (p1 + p0 = p0 + p1, the same sums as a separate total)."""
        image, plan = prepare(volume.hu, volume.affine_lps, self._bundle.preprocess_settings)
        n_labels = len(self._bundle.labels.labels)
        model_affine = np.asarray(plan.model_affine_lps)
        counts: list[np.ndarray] = []
        total: torch.Tensor | None = None
        label_probs: torch.Tensor | None = None
        with self._lock, torch.inference_mode():  # the samples are inference tensors
            if self._device.type == "cpu":
                torch.set_num_threads(self._num_threads)
            for i, probs in enumerate(predict_samples(
                self._network, image, self._bundle.network_settings.img_size, self._device,
                self._uncertainty_samples, sw_batch_size=self._sw_batch_size, overlap=self._overlap, mode=self._mode,
                precision=self._precision,
            )):
                labels = self._sample_labels(probs)
                counts.append(bin_counts(labels, split_sides(labels, model_affine, femur_id=self._femur_id), n_labels))
                del labels
                if i == 0:
                    label_probs = probs
                elif i == 1:
                    total = probs.add_(label_probs)
                    if self._mirror:  # as predict_scores(mirror=True): (p0 + p1) * 0.5
                        label_probs.copy_(total).mul_(0.5)  # type: ignore[union-attr]
                else:
                    total.add_(probs)  # type: ignore[union-attr]
                del probs
            assert total is not None and label_probs is not None
            total /= float(len(counts))
            entropy = voxel_entropy(total)
            del total
        return label_probs, plan, entropy, counts

    def _sample_labels(self, probs: torch.Tensor, slab: int = 16) -> np.ndarray:
        """Model-grid labels of one sample (argmax after the volume calibration), ``slab`` slices at a
        time: no calibrated copy of the whole score volume."""
        labels = np.empty(tuple(probs.shape[1:]), dtype=np.uint8)
        for a in range(0, probs.shape[1], slab):
            part = probs[:, a:a + slab]
            if self._bundle.class_weights is not None:
                part = scale_classes(part, self._bundle.class_weights)
            labels[a:a + slab] = torch.argmax(part, dim=0).to(torch.uint8).numpy()
        return labels

    def _summarise(self, entropy: np.ndarray, counts: list[np.ndarray], plan: PreprocessPlan,
                   label_map: np.ndarray, side_map: np.ndarray) -> SegmentationUncertainty:
        """Summaries per structure and side of the final (cleaned-up) label map on the volume's grid."""
        entropy_u8 = restore_labels(quantise_entropy(entropy), plan)
        structures = summarise(entropy_u8, label_map, side_map, counts, len(self._bundle.labels.labels),
                               method=UNCERTAINTY_TTA, thresholds=self._thresholds, entropy_scale=1.0 / 255.0)
        return SegmentationUncertainty(
            method=UNCERTAINTY_TTA, n_samples=len(counts), structures=structures,
            entropy_map_u8=entropy_u8, thresholds=self._thresholds,
        )

    def postprocess(self, label_map: np.ndarray, affine_lps: np.ndarray, *,
                    in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(label map, side map) of a restored label map: the side split by the patient's midline and,
        unless switched off, the largest components per structure and side. The volume calibration
        (modelkit.calibration) fits through this same step. ``in_place``: the islands are dropped
        from ``label_map`` itself (the segment stage's own array: no second full-size copy)."""
        side_map = split_sides(label_map, affine_lps, femur_id=self._femur_id)
        if self._keep_largest:
            label_map = keep_largest_components(label_map, side_map, out=label_map if in_place else None)
            for k in range(0, label_map.shape[0], 32):  # no side where no label is left, a slab at a time
                side_map[k:k + 32][label_map[k:k + 32] == 0] = 0
        return label_map, side_map

    def segment(self, volume: Volume) -> Segmentation:
        """Label map (and side map) on the volume's grid."""
        started = time.monotonic()
        uncertainty: SegmentationUncertainty | None = None
        try:
            if self._uncertainty == UNCERTAINTY_TTA:
                probs, plan, entropy, counts = self.predict_tta(volume)
            else:
                probs, plan = self.predict(volume)
            if self._bundle.class_weights is not None:
                probs = scale_classes(probs, self._bundle.class_weights, in_place=True)
            label_map = restore_probabilities(probs, plan)
            del probs
            if self._metal_exclude_hu is not None:
                _exclude_metal(label_map, volume.hu, self._metal_exclude_hu)
            label_map, side_map = self.postprocess(label_map, volume.affine_lps, in_place=True)
            if self._uncertainty == UNCERTAINTY_TTA:
                uncertainty = self._summarise(entropy, counts, plan, label_map, side_map)
        except SegmentationError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise SegmentationError(
                f"segmentation of series {volume.series_instance_uid} (shape {volume.shape}) with "
                f"{self._bundle.name} {self._bundle.version} on {self._device} failed: {exc}"
            ) from exc
        release_freed_memory()
        logger.info(
            "segmented series %s shape %s with %s %s on %s in %.1f s (uncertainty %s)",
            volume.series_instance_uid,
            volume.shape,
            self._bundle.name,
            self._bundle.version,
            self._device,
            time.monotonic() - started,
            self._uncertainty_label(),
        )
        return Segmentation(
            label_map=label_map,
            side_map=side_map,
            labels=self._bundle.labels,
            model_name=self._bundle.name,
            model_version=self._bundle.version,
            affine_lps=np.array(volume.affine_lps, copy=True),
            model_sha256=self._bundle.weights_sha256,
            uncertainty=uncertainty,
        )
