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

import numpy as np
import torch

from pipeline.bundle import Bundle
from pipeline.errors import SegmentationError
from pipeline.labels import FEMUR_KEY
from pipeline.postprocess import keep_largest_components, split_sides
from pipeline.preprocess import PreprocessPlan, prepare, restore_probabilities
from pipeline.types import Segmentation, Volume

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
) -> torch.Tensor:
    """Softmax class probabilities ``(C, D, H, W)`` (float32, CPU) for a ``(1, D, H, W)`` model input.

    MONAI ``sliding_window_inference`` under ``torch.inference_mode``; bfloat16/float16
    autocast on CUDA only (CPU autocast is slower for these 3-D convolutions). ``mirror``:
    the mean of the probabilities of the input and of its mirror along the last axis (x).
    """
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def _probs(inp: torch.Tensor) -> torch.Tensor:
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

    with torch.inference_mode(), autocast:
        probs = _probs(x)
        if mirror:
            probs += torch.flip(_probs(torch.flip(x, dims=(-1,))), dims=(-1,))
            probs *= 0.5
    return probs.cpu()


def scale_classes(probs: torch.Tensor, weights) -> torch.Tensor:
    """``probs`` (C, ...) times a per-class factor (the bundle's volume calibration): the one place
    both the Segmenter and the calibration fit (modelkit.calibration) apply the factors."""
    return probs * torch.tensor(weights, dtype=probs.dtype)[(slice(None),) + (None,) * (probs.dim() - 1)]


#: Voxels at or above this HU are metal (implants), never a structure: the segmentation leaves them
#: unlabelled, so bone labels exclude the metal. The measurement's default metal threshold.
METAL_EXCLUDE_HU = 2000.0


def _exclude_metal(label_map: np.ndarray, hu: np.ndarray, threshold_hu: float, slab: int = 32) -> None:
    """Background where ``hu >= threshold_hu`` (in place, a slab of slices at a time)."""
    for k in range(0, hu.shape[0], slab):
        metal = hu[k:k + slab] >= threshold_hu
        if metal.any():
            label_map[k:k + slab][metal] = 0


class Segmenter:
    """Segments volumes with one bundle. Thread-safe; load once and share.

    ``metal_exclude_hu``: voxels at or above it are set to background before the clean-up (None: off).
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
    ) -> None:
        self._bundle = bundle
        self._metal_exclude_hu = metal_exclude_hu
        self._device = select_device(device)
        self._sw_batch_size = int(sw_batch_size if sw_batch_size is not None else bundle.sliding_window.sw_batch_size)
        self._overlap = float(overlap if overlap is not None else bundle.sliding_window.overlap)
        self._mode = bundle.sliding_window.mode
        self._mirror = bool(mirror if mirror is not None else bundle.sliding_window.mirror)
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
                f"volume calibration {'on' if self._bundle.class_weights is not None else 'off'}")

    @property
    def device(self) -> torch.device:
        return self._device

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
            )
        return probs, plan

    def postprocess(self, label_map: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label map, side map) of a restored label map: the side split by the patient's midline and,
        unless switched off, the largest components per structure and side. The volume calibration
        (modelkit.calibration) fits through this same step."""
        side_map = split_sides(label_map, affine_lps, femur_id=self._femur_id)
        if self._keep_largest:
            label_map = keep_largest_components(label_map, side_map)
            side_map = np.where(label_map > 0, side_map, 0).astype(np.uint8)
        return label_map, side_map

    def segment(self, volume: Volume) -> Segmentation:
        """Label map (and side map) on the volume's grid."""
        started = time.monotonic()
        try:
            probs, plan = self.predict(volume)
            if self._bundle.class_weights is not None:
                probs = scale_classes(probs, self._bundle.class_weights)
            label_map = restore_probabilities(probs, plan)
            del probs
            if self._metal_exclude_hu is not None:
                _exclude_metal(label_map, volume.hu, self._metal_exclude_hu)
            label_map, side_map = self.postprocess(label_map, volume.affine_lps)
        except SegmentationError:
            raise
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise SegmentationError(
                f"segmentation of series {volume.series_instance_uid} (shape {volume.shape}) with "
                f"{self._bundle.name} {self._bundle.version} on {self._device} failed: {exc}"
            ) from exc
        logger.info(
            "segmented series %s shape %s with %s %s on %s in %.1f s",
            volume.series_instance_uid,
            volume.shape,
            self._bundle.name,
            self._bundle.version,
            self._device,
            time.monotonic() - started,
        )
        return Segmentation(
            label_map=label_map,
            side_map=side_map,
            labels=self._bundle.labels,
            model_name=self._bundle.name,
            model_version=self._bundle.version,
            affine_lps=np.array(volume.affine_lps, copy=True),
            model_sha256=self._bundle.weights_sha256,
        )
