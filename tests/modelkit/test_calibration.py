"""Volume calibration: per-class factors that remove a systematic volume bias, stored in the bundle
and applied by the Segmenter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.calibration import fit_class_weights
from pipeline.bundle import METADATA_PATH, load_bundle, set_class_weights, write_bundle
from pipeline.errors import BundleError
from pipeline.inference import Segmenter, scale_classes
from pipeline.labels import load_label_table
from pipeline.network import NetworkSettings, build_network
from pipeline.preprocess import PreprocessSettings, prepare, restore_probabilities
from pipeline.types import Volume

torch.set_num_threads(1)
TINY = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)


def _model_grid_centres(plan) -> list[np.ndarray]:
    """Original-grid coordinates (k, r, c) of the voxel centres of a plan's cropped, resampled model grid."""
    centres = [np.linspace(s.start - 0.5 + (s.stop - s.start) / n / 2, s.stop - 0.5 - (s.stop - s.start) / n / 2, n)
               for s, n in zip(plan.crop_slices(), plan.model_shape)]
    return np.meshgrid(*centres, indexing="ij")


def _ball_case(radius: float, shrink: float, softness: float = 1.0):
    """A ball of class 1 (radius in voxels of a 1 mm grid) inside a body; model-grid probabilities
    (2 mm grid) whose class-1 boundary lies ``shrink`` mm inside the true one (a biased model)."""
    shape = (40, 40, 40)
    k, r, c = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    dist = np.sqrt((k - 20) ** 2 + (r - 20) ** 2 + (c - 20) ** 2)
    truth = (dist < radius).astype(np.uint8)
    hu = np.where(dist < 18, 40.0, -1000.0).astype(np.float32)
    _, plan = prepare(hu, np.diag([1.0, 1.0, 1.0, 1.0]), PreprocessSettings(spacing_mm=(2.0, 2.0, 2.0)))
    m = plan.model_shape
    mk, mr, mc = _model_grid_centres(plan)
    mdist = np.sqrt((mk - 20) ** 2 + (mr - 20) ** 2 + (mc - 20) ** 2)
    p1 = 1.0 / (1.0 + np.exp((mdist - (radius - shrink)) / softness))
    probs = np.zeros((30,) + tuple(m), np.float32)
    probs[1] = p1
    probs[0] = 1.0 - p1
    return torch.from_numpy(probs), plan, truth


def test_fit_removes_a_systematic_volume_bias() -> None:
    cases = []
    for radius in (8.0, 11.0):
        probs, plan, truth = _ball_case(radius, shrink=1.5)
        counts = np.bincount(truth.ravel(), minlength=30)[:30].astype(np.float64)
        cases.append((probs, plan, counts * 0.001, 0.001))
    weights, before, after, _ = fit_class_weights(cases, 30, iterations=8)
    true_ml = sum(c[2] for c in cases)
    assert before[1] < 0.8 * true_ml[1]  # the biased model under-segments
    assert after[1] == pytest.approx(true_ml[1], rel=0.03)  # calibrated
    assert weights[1] > 1.0 and weights[0] == 1.0
    assert np.all(weights[2:] == 1.0)  # absent classes are left alone
    # the restore with the weights is what the Segmenter does
    probs, plan, truth = _ball_case(11.0, shrink=1.5)
    scaled = probs * torch.tensor(weights, dtype=torch.float32)[:, None, None, None]
    calibrated = restore_probabilities(scaled, plan)
    assert (calibrated == 1).sum() == pytest.approx((truth == 1).sum(), rel=0.06)


def test_fit_converges_where_the_volume_responds_weakly_to_the_factor() -> None:
    """A confident model (steep probability edge): a factor moves its boundary little, so a plain
    ratio update stops short of the truth; the fit must still reach it (it did not: the shipped
    bundle's validation set kept 2-4 % of bias after the fixed 8 iterations)."""
    cases = []
    for radius in (8.0, 11.0):
        probs, plan, truth = _ball_case(radius, shrink=1.0, softness=0.25)
        counts = np.bincount(truth.ravel(), minlength=30)[:30].astype(np.float64)
        cases.append((probs, plan, counts * 0.001, 0.001))
    weights, before, after, done = fit_class_weights(cases, 30, tolerance=0.01)
    true_ml = sum(c[2] for c in cases)
    assert 1 < done < 30  # stopped at the tolerance
    assert before[1] < 0.85 * true_ml[1]
    assert after[1] == pytest.approx(true_ml[1], rel=0.01)
    assert weights[1] > 1.0 and np.all(weights[2:] == 1.0)


def _bundle(tmp_path: Path, **kw) -> Path:
    labels = load_label_table()
    torch.manual_seed(0)
    net = build_network(TINY, labels.num_classes)
    return write_bundle(tmp_path / "b", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)), labels,
                        {"name": "tiny", "version": "0.0.1"}, **kw)


def test_weights_round_trip_through_the_bundle(tmp_path: Path) -> None:
    labels = load_label_table()
    path = _bundle(tmp_path)
    assert load_bundle(path, labels).class_weights is None
    weights = [1.0] + [1.0 + i / 100 for i in range(1, 30)]
    set_class_weights(path, weights, {"cases": ["a"]})
    assert load_bundle(path, labels).class_weights == pytest.approx(weights)
    meta = json.loads((path / METADATA_PATH).read_text())
    assert meta["class_weights_calibration"] == {"cases": ["a"]}


@pytest.mark.parametrize("weights, message", [
    ([1.0] * 29, "class_weights has 29 values; the label table needs 30"),
    ([1.0] * 29 + [-1.0], "class_weights must be finite and > 0; class 29 is -1.0"),
])
def test_invalid_weights_are_refused(tmp_path: Path, weights, message) -> None:
    path = _bundle(tmp_path)
    meta = json.loads((path / METADATA_PATH).read_text())
    meta["class_weights"] = weights
    (path / METADATA_PATH).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(path, load_label_table())


def test_segmenter_applies_the_weights(tmp_path: Path) -> None:
    labels = load_label_table()
    shape = (20, 24, 28)
    k, r, c = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.where(((r - 12) / 10) ** 2 + ((c - 14) / 12) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
    volume = Volume(hu=hu, affine_lps=np.diag([3.0, 2.0, 2.0, 1.0]), frame_of_reference_uid="1", study_instance_uid="2",
                    series_instance_uid="3", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=())
    plain = Segmenter(load_bundle(_bundle(tmp_path / "a"), labels), device="cpu", keep_largest=False).segment(volume)
    favour = [1.0] * 30
    favour[7] = 1e6  # class 7 wins wherever the model gives it any probability
    weighted_path = _bundle(tmp_path / "b", class_weights=tuple(favour))
    weighted = Segmenter(load_bundle(weighted_path, labels), device="cpu", keep_largest=False).segment(volume)
    assert (weighted.label_map == 7).sum() > (plain.label_map == 7).sum()
    assert (weighted.label_map == 7).mean() > 0.5


def _two_ball_case():
    """Class 1 in two separate parts, the second a tenth of the first; model-grid probabilities that
    are right on both (no bias of the model itself)."""
    shape = (48, 40, 40)
    k, r, c = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    big = np.sqrt((k - 18) ** 2 + (r - 20) ** 2 + (c - 20) ** 2)
    small = np.sqrt((k - 38) ** 2 + (r - 20) ** 2 + (c - 20) ** 2)
    truth = ((big < 10.0) | (small < 4.6)).astype(np.uint8)
    hu = np.where((np.abs(r - 20) < 18) & (np.abs(c - 20) < 18), 40.0, -1000.0).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    _, plan = prepare(hu, affine, PreprocessSettings(spacing_mm=(2.0, 2.0, 2.0)))
    m = plan.model_shape
    mk, mr, mc = _model_grid_centres(plan)
    mbig = np.sqrt((mk - 18) ** 2 + (mr - 20) ** 2 + (mc - 20) ** 2)
    msmall = np.sqrt((mk - 38) ** 2 + (mr - 20) ** 2 + (mc - 20) ** 2)
    p1 = np.maximum(1.0 / (1.0 + np.exp(mbig - 10.0)), 1.0 / (1.0 + np.exp(msmall - 4.6)))
    probs = np.zeros((30,) + tuple(m), np.float32)
    probs[1] = p1
    probs[0] = 1.0 - p1
    return torch.from_numpy(probs), plan, truth, affine


def test_fit_calibrates_what_the_node_reports_after_its_clean_up() -> None:
    """The node drops islands under a fifth of a structure's largest part (keep_largest_components);
    a fit on the bare restored label map cannot see that loss (the demo bundle's iliacus: -10.6 % on
    held-out phantoms, half of it a real part removed as an island). With the node's post-processing
    in the fit, the reported volume matches the truth."""
    from pipeline.postprocess import keep_largest_components, split_sides

    probs, plan, truth, affine = _two_ball_case()
    true_ml = np.bincount(truth.ravel(), minlength=30)[:30].astype(np.float64) * 0.001

    def node(label_map: np.ndarray) -> np.ndarray:
        return keep_largest_components(label_map, split_sides(label_map, affine))

    def reported(weights: np.ndarray) -> float:
        return float((node(restore_probabilities(scale_classes(probs, weights), plan)) == 1).sum()) * 0.001

    assert reported(np.ones(30)) < 0.95 * true_ml[1]  # the island is lost
    bare, _, _, _ = fit_class_weights([(probs, plan, true_ml, 0.001)], 30, tolerance=0.01)
    assert reported(bare) < 0.95 * true_ml[1]  # a fit without the clean-up does not correct it
    weights, before, after, _ = fit_class_weights([(probs, plan, true_ml, 0.001)], 30, tolerance=0.01,
                                                  finish=[node])
    assert before[1] < 0.95 * true_ml[1]  # "before" is what the node reported, clean-up included
    assert after[1] == pytest.approx(true_ml[1], rel=0.01)
    assert reported(weights) == pytest.approx(true_ml[1], rel=0.01)


def test_fit_returns_its_best_round_and_stops_when_the_clean_up_keeps_it_from_the_tolerance() -> None:
    """Through the node's clean-up a class's volume is not a smooth function of its factor (an island
    kept or dropped), so the fit can circle the truth without reaching the tolerance (the demo's
    12-phantom fit: 2.98, 9.13, 2.73, 1.73, 1.04, 0.86, 3.16, 0.56, 0.58, 0.71 %). It must return
    the weights of its best round, not of its last, and stop when rounds no longer improve."""
    probs, plan, truth = _ball_case(9.0, shrink=1.0, softness=0.5)
    true_ml = np.bincount(truth.ravel(), minlength=30)[:30].astype(np.float64) * 0.001
    seen: list[float] = []

    def jumpy(label_map: np.ndarray) -> np.ndarray:
        """Drops a slab of class 1 whose size depends on the volume's last digits: a ragged response."""
        n = int((label_map == 1).sum())
        out = label_map.copy()
        cut = (n * 7919) % 23  # 0..22 slices of class 1 voxels dropped, pseudo-randomly
        idx = np.flatnonzero(out.ravel() == 1)[: cut * 40]
        out.ravel()[idx] = 0
        seen.append(float((out == 1).sum()) * 0.001)
        return out

    weights, _, after, done = fit_class_weights([(probs, plan, true_ml, 0.001)], 30, tolerance=0.0001,
                                                finish=[jumpy])
    errors = [abs(v - true_ml[1]) / true_ml[1] for v in seen]
    assert done < 30  # stopped: no better round for a while
    assert abs(after[1] - true_ml[1]) / true_ml[1] == pytest.approx(min(errors))  # the best round's volume
    assert abs(seen[-1] - true_ml[1]) / true_ml[1] > min(errors)  # ... which was not the last one
    assert float((jumpy(restore_probabilities(scale_classes(probs, weights), plan)) == 1).sum()) * 0.001 == \
        pytest.approx(after[1])  # and the weights returned give it


def _case_errors(weights, cases_with_truth) -> list[float]:
    out = []
    for probs, plan, truth in cases_with_truth:
        pred = (restore_probabilities(scale_classes(probs, weights), plan) == 1).sum()
        out.append(abs(float(pred) - float((truth == 1).sum())) / float((truth == 1).sum()))
    return out


def test_median_objective_fits_the_typical_case_not_the_largest() -> None:
    """Pooled volumes are dominated by the largest subjects: where a model's bias differs with size
    (a thin muscle of a small subject loses relatively more at its edges), a pooled fit leaves the
    typical subject biased. The median objective makes the typical case's ratio 1, so the mean
    per-case error (what `thighnode evaluate` reports) is smaller."""
    big = _ball_case(12.0, shrink=0.0)  # unbiased, large
    smalls = [_ball_case(6.0, shrink=1.0), _ball_case(6.5, shrink=1.0)]  # biased, small
    all_cases = [big, *smalls]
    fit_input = [(p, plan, np.bincount(t.ravel(), minlength=30)[:30].astype(np.float64) * 0.001, 0.001)
                 for p, plan, t in all_cases]
    pooled, *_ = fit_class_weights(fit_input, 30, tolerance=0.01)
    per_case: dict = {}
    median, _, _, _ = fit_class_weights(fit_input, 30, tolerance=0.01, objective="median", per_case=per_case)
    pooled_err, median_err = _case_errors(pooled, all_cases), _case_errors(median, all_cases)
    assert np.mean(median_err) < np.mean(pooled_err)
    assert sorted(median_err)[1] <= 0.02  # the median case is right
    assert max(pooled_err[1:]) > 0.05  # the pooled fit leaves the small cases off
    assert per_case["before"].shape == per_case["after"].shape == (3, 30)
    with pytest.raises(ValueError, match="calibration objective 'mean'; allowed: pooled, median"):
        fit_class_weights(fit_input, 30, objective="mean")
