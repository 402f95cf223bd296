"""modelkit.sidecheck: one leg atrophied -> the loss shows on that side only.

The shipped bundle must pass the check on a held-out phantom pair; segmenter doubles that
replay ground-truth label maps show that the check passes a perfect segmentation and fails
one that misses the loss or puts it on the wrong side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modelkit.phantom import generate_phantom
from modelkit.sidecheck import DEFAULT_ATROPHY, run_sidecheck, sidecheck_params
from pipeline.labels import load_label_table
from pipeline.postprocess import split_sides
from pipeline.types import Segmentation, Volume

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "thighnode_demo"
SPACING = 3.0


class Replay:
    """Returns the label maps of the given phantoms, one per call, in order."""

    def __init__(self, phantoms) -> None:
        self._phantoms = list(phantoms)
        self.bundle = SimpleNamespace(labels=load_label_table())

    def segment(self, volume: Volume) -> Segmentation:
        p = self._phantoms.pop(0)
        assert p.labels.shape == volume.shape
        sides = split_sides(p.labels, volume.affine_lps, p.midline_x_mm)
        return Segmentation(p.labels, sides, self.bundle.labels, "replay", "0", affine_lps=volume.affine_lps)


@pytest.fixture(scope="module")
def pair():
    base, follow = sidecheck_params(SPACING)
    return generate_phantom(base), generate_phantom(follow)


def test_the_follow_up_lost_volume_on_the_right_only(pair) -> None:
    prior, follow = pair
    table = load_label_table()
    for key, fraction in DEFAULT_ATROPHY.items():
        label = table.by_key(key.split(":")[0])
        right = ~prior.side_of_columns()
        before = int((prior.labels[..., right] == label.id).sum())
        after = int((follow.labels[..., right] == label.id).sum())
        assert after / before == pytest.approx(fraction, abs=0.01)


def test_ground_truth_segmentation_passes(pair) -> None:
    result = run_sidecheck(BUNDLE, spacing_mm=SPACING, segmenter=Replay(pair))
    assert result.passed and result.magnitude_ok, result.format_table()
    for c in result.changes:
        assert c.model_ratio == pytest.approx(c.true_ratio, abs=0.02), c


def test_a_segmentation_that_misses_the_loss_fails(pair) -> None:
    prior, _ = pair
    result = run_sidecheck(BUNDLE, spacing_mm=SPACING, segmenter=Replay([prior, prior]))
    assert not result.passed and not result.magnitude_ok
    assert any("vastus_lateralis right" in f for f in result.failures)


def test_a_loss_on_the_wrong_side_fails(pair) -> None:
    prior, follow = pair
    base, _ = sidecheck_params(SPACING)
    mirrored = {k.replace(":right", ":left"): v for k, v in DEFAULT_ATROPHY.items()}
    wrong = generate_phantom(dataclasses.replace(base, atrophy=mirrored, scan_seed=base.seed + 1_000_003))
    result = run_sidecheck(BUNDLE, spacing_mm=SPACING, segmenter=Replay([prior, wrong]))
    assert not result.passed
    assert any(f.startswith("left leg") for f in result.failures)


def test_only_right_sided_atrophy_is_accepted() -> None:
    with pytest.raises(ValueError, match="right leg only"):
        run_sidecheck(BUNDLE, spacing_mm=SPACING, atrophy={"vastus_lateralis:left": 0.8}, segmenter=Replay([]))


def test_the_shipped_bundle_shows_the_loss_on_the_atrophied_side_only() -> None:
    result = run_sidecheck(BUNDLE, spacing_mm=SPACING)
    print(result.format_table())
    assert result.passed, result.format_table()
    atrophied = [c for c in result.changes if c.atrophied]
    assert len(atrophied) == len(DEFAULT_ATROPHY)
    assert all(c.model_ratio is not None and c.model_ratio < -0.025 for c in atrophied)
    assert abs(result.model_total["left"]) < 0.02 < abs(result.model_total["right"])
