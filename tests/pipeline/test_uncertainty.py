"""Per-structure uncertainty from test-time augmentation (pipeline.uncertainty, Segmenter(uncertainty="tta"))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import SegmentationError
from pipeline.inference import Segmenter, predict_samples
from pipeline.types import SIDE_LEFT, SIDE_RIGHT, StructureUncertainty
from pipeline.uncertainty import (
    UncertaintyThresholds,
    bin_counts,
    summarise,
    voxel_entropy,
    volume_cv_pct,
)
from tests.pipeline.test_inference import _volume, bundle  # noqa: F401  (module fixture)

torch.set_num_threads(1)


def test_entropy_is_zero_for_one_hot_and_one_for_uniform() -> None:
    one_hot = np.zeros((5, 2, 3), dtype=np.float32)
    one_hot[2] = 1.0
    assert np.all(voxel_entropy(one_hot) == 0.0)
    uniform = np.full((5, 2, 3), 0.2, dtype=np.float32)
    assert np.allclose(voxel_entropy(uniform), 1.0, atol=1e-6)
    assert np.allclose(voxel_entropy(uniform, normalise=False), math.log(5), atol=1e-5)
    between = np.array([0.5, 0.5, 0.0, 0.0, 0.0], dtype=np.float32)[:, None]
    assert voxel_entropy(between)[0] == pytest.approx(math.log(2) / math.log(5), rel=1e-5)


def test_volume_cv_is_zero_for_identical_samples_and_positive_otherwise() -> None:
    assert volume_cv_pct([120.0, 120.0, 120.0]) == 0.0
    assert volume_cv_pct([0.0, 0.0]) == 0.0
    assert volume_cv_pct([90.0, 110.0]) == pytest.approx(10.0)


def _maps() -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((4, 4, 6), dtype=np.uint8)
    labels[:, :, :3] = 1
    labels[:, :, 3:] = 1
    labels[0, 0, :] = 2
    sides = np.where(labels > 0, np.where(np.arange(6) < 3, SIDE_RIGHT, SIDE_LEFT)[None, None, :], 0).astype(np.uint8)
    return labels, sides


def test_identical_samples_give_zero_spread_and_one_hot_zero_entropy() -> None:
    labels, sides = _maps()
    counts = bin_counts(labels, sides, 2)
    out = summarise(np.zeros(labels.shape, np.float32), labels, sides, [counts, counts.copy()], 2)
    assert set(out) == {(1, "right"), (1, "left"), (1, "both"), (2, "right"), (2, "left"), (2, "both")}
    for u in out.values():
        assert u.volume_cv_pct == 0.0 and u.mean_entropy == 0.0 and not u.low_confidence
        assert (u.method, u.n_samples) == ("tta", 2)


def test_differing_samples_and_entropy_are_summarised_per_side() -> None:
    labels, sides = _maps()
    a = bin_counts(labels, sides, 2)
    other = labels.copy()
    other[1:, :, 3:] = 0  # the second sample loses most of structure 1 on the left
    b = bin_counts(other, np.where(other > 0, sides, 0).astype(np.uint8), 2)
    entropy = np.where(sides == SIDE_LEFT, 0.5, 0.0).astype(np.float32)
    out = summarise(entropy, labels, sides, [a, b], 2)
    assert out[(1, "right")].volume_cv_pct == 0.0 and out[(1, "right")].mean_entropy == 0.0
    assert out[(1, "left")].volume_cv_pct > 40.0 and out[(1, "left")].mean_entropy == pytest.approx(0.5)
    assert 0.0 < out[(1, "both")].volume_cv_pct < out[(1, "left")].volume_cv_pct


def test_low_confidence_flag_is_set_above_either_threshold() -> None:
    thr = UncertaintyThresholds(mean_entropy=0.1, volume_cv_pct=2.0)
    assert not thr.is_low_confidence(0.1, 2.0)
    assert thr.is_low_confidence(0.11, 0.0)
    assert thr.is_low_confidence(0.0, 2.5)
    labels, sides = _maps()
    counts = bin_counts(labels, sides, 2)
    entropy = np.where(labels == 2, 0.3, 0.05).astype(np.float32)
    out = summarise(entropy, labels, sides, [counts, counts], 2, thresholds=thr)
    assert out[(2, "right")].low_confidence and out[(2, "left")].low_confidence
    assert not out[(1, "right")].low_confidence


def test_thresholds_from_bundle_metadata() -> None:
    assert UncertaintyThresholds.from_metadata({}) is None
    thr = UncertaintyThresholds.from_metadata(
        {"uncertainty": {"mean_entropy_threshold": 0.2, "volume_cv_pct_threshold": 3, "how_chosen": "x"}})
    assert thr == UncertaintyThresholds(0.2, 3.0, "x")
    with pytest.raises(ValueError, match="mean_entropy_threshold"):
        UncertaintyThresholds.from_metadata({"uncertainty": {"volume_cv_pct_threshold": 3}})
    with pytest.raises(ValueError, match="allowed a finite number"):
        UncertaintyThresholds(-1.0, 1.0)


def test_structure_uncertainty_record_round_trip_and_validation() -> None:
    u = StructureUncertainty("tta", 2, 0.123456, 4.5, True)
    assert StructureUncertainty.from_record(u.to_record()) == u
    with pytest.raises(ValueError, match="n_samples"):
        StructureUncertainty("tta", 0, 0.1, 1.0)
    with pytest.raises(ValueError, match="mean_entropy"):
        StructureUncertainty("tta", 2, float("nan"), 1.0)


def test_samples_are_identity_mirror_and_shift_on_the_input_grid(bundle) -> None:  # noqa: F811
    from pipeline.inference import predict_scores

    rng = np.random.default_rng(1)
    image = rng.random((1, 20, 24, 28)).astype(np.float32)
    net, roi, dev = bundle.network, bundle.network_settings.img_size, torch.device("cpu")
    samples = list(predict_samples(net, image, roi, dev, 3))
    assert [tuple(s.shape) for s in samples] == [(30, 20, 24, 28)] * 3
    assert torch.allclose(samples[0], predict_scores(net, image, roi, dev), atol=1e-6)
    assert torch.allclose(0.5 * (samples[0] + samples[1]), predict_scores(net, image, roi, dev, mirror=True), atol=1e-5)
    assert not torch.allclose(samples[2], samples[0], atol=1e-4)  # another window grid
    with pytest.raises(SegmentationError, match="allowed 1..4"):
        list(predict_samples(net, image, roi, dev, 5))


def test_segmenter_attaches_uncertainty_without_changing_the_label_map(bundle) -> None:  # noqa: F811
    volume = _volume(np.diag([3.0, 2.0, 2.0, 1.0]))
    plain = Segmenter(bundle, device="cpu", num_threads=1).segment(volume)
    assert plain.uncertainty is None
    seg = Segmenter(bundle, device="cpu", num_threads=1, uncertainty="tta", uncertainty_samples=2).segment(volume)
    assert np.array_equal(seg.label_map, plain.label_map)
    u = seg.uncertainty
    assert u is not None and (u.method, u.n_samples) == ("tta", 2)
    assert u.entropy_map_u8.shape == volume.shape and u.entropy_map_u8.dtype == np.uint8
    present = {(int(l), s) for l in np.unique(seg.label_map[seg.label_map > 0]) for s in ("both",)}
    assert present <= set(u.structures)
    assert all(0.0 <= v.mean_entropy <= 1.0 and v.volume_cv_pct >= 0.0 for v in u.structures.values())
    assert u.thresholds is None and not any(v.low_confidence for v in u.structures.values())


def test_segmenter_refuses_bad_uncertainty_settings(bundle) -> None:  # noqa: F811
    with pytest.raises(SegmentationError, match="uncertainty = 'mc'"):
        Segmenter(bundle, device="cpu", uncertainty="mc")
    with pytest.raises(SegmentationError, match="allowed 2..4"):
        Segmenter(bundle, device="cpu", uncertainty="tta", uncertainty_samples=1)
