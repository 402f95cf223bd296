"""The shipped bundle on the real TotalSegmentator hip CT: a label map on that grid, compared with the
reference labels. The demonstration model is phantom-trained: only a low floor is asserted (the figures are
reported by `thighnode realcheck`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkit.realcheck import REFERENCE_IDS, load_reference_case, run

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "thighnode_demo"


def test_real_hip_ct_is_segmented_on_its_own_grid_and_scored(shared_data: Path) -> None:
    data = shared_data / "totalseg-hip-ct"
    volume, reference = load_reference_case(data)
    segmentation, scores = run(BUNDLE, data)
    assert segmentation.label_map.shape == volume.shape == reference.shape
    np.testing.assert_allclose(segmentation.affine_lps, volume.affine_lps)
    assert len(scores) == len(REFERENCE_IDS)
    assert all(0.0 <= s.dice <= 1.0 for s in scores)
    femur = {s.side: s for s in scores if s.key == "femur"}
    assert femur["right"].predicted_ml > 30 and femur["left"].predicted_ml > 30
    assert np.mean([s.dice for s in scores]) > 0.2


def _score(key: str, side: str, dice: float) -> "RealScore":
    from modelkit.realcheck import RealScore

    return RealScore(key, side, dice, 100.0, 90.0)


def test_the_reference_mean_leaves_the_ilium_apart_and_the_table_sets_phantom_and_real_side_by_side() -> None:
    from modelkit.evaluation import EvaluationReport, StructureScore
    from modelkit.realcheck import format_beside, reference_mean_dice

    scores = [_score("femur", "left", 0.6), _score("femur", "right", 0.8), _score("ilium", "left", 0.1)]
    assert reference_mean_dice(scores) == pytest.approx(0.7)  # the ilium's 0.1 does not count
    phantom = EvaluationReport(
        "b", "1.0", ("c1",),
        (StructureScore("c1", 1, "femur", "left", 0.95, 0.01, 100.0, 101.0),
         StructureScore("c1", 1, "femur", "right", 0.93, 0.01, 100.0, 101.0),
         StructureScore("c1", 2, "ilium", "left", 0.91, 0.01, 100.0, 101.0)),
        1.0,
    )
    table = format_beside(phantom, scores)
    rows = {tuple(line.split()[:4]) for line in table.splitlines()}
    assert ("femur", "left", "0.950", "0.600") in rows and ("femur", "right", "0.930", "0.800") in rows
    assert "mean Dice over 2 reference structure-sides" in table and ": 0.700" in table
    assert "ilium against the whole hip bone, apart: 0.100" in table
