"""The shipped bundle on the real TotalSegmentator hip CT: a label map on that grid, compared with the
reference labels. The demonstration model is phantom-trained: only a low floor is asserted (the figures are
reported by `thighnode realcheck`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
