"""A segmenter double that returns phantoms' own labels (tests the node's wiring, not the model)."""

from __future__ import annotations

import numpy as np

from pipeline.labels import LabelTable
from modelkit.phantom import Phantom
from pipeline.postprocess import split_sides
from pipeline.types import Segmentation, Volume


class TruthSegmenter:
    """Labels a loaded volume with the ground truth of the phantom its study was written from.

    The DICOM series of a phantom is written on the phantom's grid; slices are matched by z.
    ``phantoms`` maps StudyInstanceUID -> Phantom.
    """

    def __init__(self, phantoms: dict[str, Phantom], labels: LabelTable) -> None:
        self._phantoms = phantoms
        self._labels = labels

    def segment(self, volume: Volume) -> Segmentation:
        phantom = self._phantoms[volume.study_instance_uid]
        z_vol = volume.affine_lps[2, 3] + np.arange(volume.shape[0]) * volume.affine_lps[2, 0]
        z_ph = phantom.affine_lps[2, 3] + np.arange(phantom.labels.shape[0]) * phantom.affine_lps[2, 0]
        idx = np.array([int(np.argmin(np.abs(z_ph - z))) for z in z_vol])
        label_map = phantom.labels[idx]
        if label_map.shape != volume.shape:
            raise AssertionError(f"phantom grid {label_map.shape} does not match the volume {volume.shape}")
        side_map = split_sides(label_map, volume.affine_lps, phantom.midline_x_mm)
        return Segmentation(label_map, side_map, self._labels, "truth", "0.0.1", volume.affine_lps)
