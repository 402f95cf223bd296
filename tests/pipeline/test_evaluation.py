"""Metrics on known masks, and the report's table/CSV."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation import EvaluationReport, dice_per_structure, ravd_per_structure, score_case
from pipeline.labels import load_label_table


def test_dice_identical_is_one() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[1:3, 1:3, 1:3] = 2
    assert dice_per_structure(a, a, [2])[2] == 1.0
    assert math.isnan(dice_per_structure(a, a, [5])[5])


def test_dice_and_ravd_known_values() -> None:
    truth = np.zeros((1, 1, 10), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, 0:4] = 1  # 4 voxels
    pred[0, 0, 2:8] = 1  # 6 voxels, 2 overlap
    assert dice_per_structure(pred, truth, [1])[1] == pytest.approx(2 * 2 / (4 + 6))
    assert ravd_per_structure(pred, truth, [1])[1] == pytest.approx(abs(6 - 4) / 4)


def test_report_table_and_csv(tmp_path: Path) -> None:
    labels = load_label_table()
    truth = np.zeros((2, 2, 10), np.uint8)
    truth[:, :, :5] = 1
    scores = score_case("c1", truth, truth, labels, 0.008)
    report = EvaluationReport("b", "1", ("c1",), tuple(scores), 1.0)
    assert report.mean_dice() == 1.0
    assert "sartorius" in report.format_table()
    text = report.write_csv(tmp_path / "r.csv").read_text()
    assert text.splitlines()[0].startswith("case,label_id,key,side,dice,ravd")
    assert "c1,1,sartorius,both,1.000000,0.000000" in text
