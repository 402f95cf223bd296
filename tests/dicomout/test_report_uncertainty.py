"""The PDF report with uncertainty on: an entropy column in the structure table, the low-confidence
legend, and a third picture (voxel entropy over the CT)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dicomout.report import render_report
from dicomout.report_overlay import axial_entropy_rgb
from pipeline.types import Measurements, StructureUncertainty
from pipeline.uncertainty import SegmentationUncertainty
from tests.dicomout.test_report import (
    PATIENT,
    _affine,
    _header,
    _measurements,
    _pdf_text,
    _segmentation,
    _volume,
)
from pipeline.labels import load_label_table


def _inputs():
    labels = load_label_table()
    affine = _affine()
    volume, seg, meas = _volume(affine), _segmentation(affine, labels), _measurements(labels)
    entropy = np.zeros(seg.label_map.shape, dtype=np.uint8)
    entropy[seg.label_map == labels.by_key("rectus_femoris").id] = 200
    structures = tuple(
        dataclasses.replace(s, uncertainty=StructureUncertainty(
            "tta", 2, 0.78 if s.key == "rectus_femoris" else 0.03, 1.0, low_confidence=s.key == "rectus_femoris"))
        for s in meas.structures
    )
    seg = dataclasses.replace(seg, uncertainty=SegmentationUncertainty("tta", 2, {}, entropy))
    return volume, seg, dataclasses.replace(meas, structures=structures), labels


def test_report_has_the_uncertainty_column_legend_and_picture(tmp_path: Path) -> None:
    volume, seg, meas, _ = _inputs()
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=_header(True)), tmp_path)
    assert "Uncertainty" in text and "entropy R / L" in text
    assert "0.78* / 0.78*" in text  # rectus femoris: low confidence on both sides
    assert "0.03 / 0.03" in text
    assert "low confidence (*)" in text
    assert "most uncertain" in text


def test_report_without_uncertainty_has_no_column(tmp_path: Path) -> None:
    volume, seg, meas, _ = _inputs()
    plain = dataclasses.replace(meas, structures=tuple(dataclasses.replace(s, uncertainty=None) for s in meas.structures))
    text = _pdf_text(render_report(volume, dataclasses.replace(seg, uncertainty=None), plain, PATIENT,
                                   study=_header(True)), tmp_path)
    assert "entropy R / L" not in text and "most uncertain" not in text


def test_entropy_picture_is_at_the_most_uncertain_level_and_coloured_there() -> None:
    volume, seg, _, labels = _inputs()
    image = axial_entropy_rgb(volume, seg)
    assert image is not None and image.plane == "axial"
    # rectus femoris (the only uncertain structure) lies below z = 0: the chosen level is there
    assert image.position_mm < 0
    red = (image.rgb[..., 0].astype(int) - image.rgb[..., 2].astype(int)) > 60
    assert red.any()
    assert axial_entropy_rgb(volume, dataclasses.replace(seg, uncertainty=None)) is None
