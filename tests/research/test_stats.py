"""Cohort statistics against independent computations (hand examples, pairwise counting, numpy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from research.stats import (
    CohortStatsError,
    auc,
    composition_table,
    describe,
    format_table,
    loss_table,
    per_muscle_loss_table,
    roc_analysis,
    roc_curve,
    spearman,
    study_total_losses,
    youden_threshold,
)


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray, *, higher_is_positive: bool) -> float:
    """P(positive ranks above negative) + 1/2 P(tie), by counting every pair (the Mann-Whitney U identity)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = 0.0
    for p, n in itertools.product(pos, neg):
        if p == n:
            wins += 0.5
        elif (p > n) == higher_is_positive:
            wins += 1.0
    return wins / (len(pos) * len(neg))


def test_roc_curve_of_a_hand_example() -> None:
    # classic example: positives score 0.35, 0.8; negatives 0.1, 0.4
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], higher_is_positive=True)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr.tolist() == [math.inf, 0.8, 0.4, 0.35, 0.1]
    assert auc(fpr, tpr) == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs are ordered correctly


@pytest.mark.parametrize("higher", [True, False])
def test_auc_equals_the_mann_whitney_identity_with_ties(higher: bool) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(0, 1, 40) + (0.8 if higher else -0.8) * labels, 1)  # rounding makes ties
    assert len(np.unique(scores)) < len(scores)
    fpr, tpr, _ = roc_curve(scores, labels, higher_is_positive=higher)
    assert auc(fpr, tpr) == pytest.approx(_pairwise_auc(scores, labels, higher_is_positive=higher))
    # and with scipy's U statistic: U(pos, neg) / (n_pos n_neg)
    from scipy.stats import mannwhitneyu

    pos, neg = scores[labels == 1], scores[labels == 0]
    u = mannwhitneyu(pos, neg).statistic if higher else mannwhitneyu(neg, pos).statistic
    assert auc(fpr, tpr) == pytest.approx(u / (len(pos) * len(neg)))


def test_low_smi_predicts_sarcopenia_direction() -> None:
    smi = [4.0, 4.5, 5.0, 5.5, 6.0, 7.0]
    sarcopenia = [1, 1, 1, 0, 0, 0]
    fpr, tpr, _ = roc_curve(smi, sarcopenia, higher_is_positive=False)
    assert auc(fpr, tpr) == 1.0
    fpr, tpr, _ = roc_curve(smi, sarcopenia, higher_is_positive=True)
    assert auc(fpr, tpr) == 0.0


def test_youden_threshold_of_a_separable_example() -> None:
    smi = np.array([5.5, 4.0, 7.0, 4.5, 6.0, 5.0])
    sarcopenia = np.array([0, 1, 0, 1, 0, 1])
    cut, sens, spec, j = youden_threshold(smi, sarcopenia, higher_is_positive=False)
    assert cut == pytest.approx(5.25)  # midway between the highest positive (5.0) and the lowest negative (5.5)
    assert (sens, spec, j) == (1.0, 1.0, 1.0)
    assert np.array_equal(smi < cut, sarcopenia.astype(bool))


@pytest.mark.parametrize("higher", [True, False])
def test_youden_threshold_is_the_brute_force_optimum(higher: bool) -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    scores = rng.normal(0, 1, 30) + (1.0 if higher else -1.0) * labels
    cut, sens, spec, j = youden_threshold(scores, labels, higher_is_positive=higher)
    s = np.sort(np.unique(scores))
    best = -1.0
    for c in (s[:-1] + s[1:]) / 2:  # every cut between two distinct scores
        called = scores > c if higher else scores < c
        jj = called[labels == 1].mean() - called[labels == 0].mean()
        best = max(best, jj)
    assert j == pytest.approx(best)
    called = scores > cut if higher else scores < cut
    assert sens == pytest.approx(called[labels == 1].mean())
    assert spec == pytest.approx(1 - called[labels == 0].mean())
    assert j == pytest.approx(sens + spec - 1)


def test_roc_rejects_bad_labels_and_single_class() -> None:
    with pytest.raises(CohortStatsError, match="labels must be 0/1"):
        roc_curve([1.0, 2.0], [0, 2], higher_is_positive=True)
    with pytest.raises(CohortStatsError, match="needs positives and negatives"):
        roc_curve([1.0, 2.0], [1, 1], higher_is_positive=True)
    with pytest.raises(CohortStatsError, match="equal length"):
        roc_curve([1.0, 2.0], [1], higher_is_positive=True)


def test_roc_analysis_bundles_curve_auc_and_cut() -> None:
    res = roc_analysis("x", [4.0, 4.5, 5.0, 5.5, 6.0, 7.0], [1, 1, 0, 1, 0, 0], higher_is_positive=False)
    assert (res.n, res.n_positive) == (6, 3)
    assert res.auc == pytest.approx(_pairwise_auc(np.array([4.0, 4.5, 5.0, 5.5, 6.0, 7.0]),
                                                  np.array([1, 1, 0, 1, 0, 0]), higher_is_positive=False))
    assert res.fpr[0] == 0.0 and res.tpr[-1] == 1.0


def test_spearman_of_monotone_pairs_and_ranks() -> None:
    x = np.arange(1.0, 11.0)
    assert spearman(x, np.exp(x))[0] == pytest.approx(1.0)
    assert spearman(x, -(x**3))[0] == pytest.approx(-1.0)
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=25), rng.normal(size=25)
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # ranks (no ties)
    assert spearman(a, b)[0] == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert all(math.isnan(v) for v in spearman([1.0, 2.0], [2.0, 3.0]))


def test_describe_matches_numpy() -> None:
    v = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    d = describe(v)
    assert d["n"] == 8
    assert d["mean"] == pytest.approx(np.mean(v)) and d["std"] == pytest.approx(np.std(v, ddof=1))
    assert (d["q1"], d["median"], d["q3"]) == pytest.approx(tuple(np.percentile(v, [25, 50, 75])))
    assert (d["min"], d["max"]) == (1.0, 9.0)
    assert describe([])["n"] == 0 and math.isnan(describe([2.0])["std"])


# -- tables on hand-made tidy rows ----------------------------------------------------------


def _row(study: str, key: str, group: str, side: str, volume: float, grp: dict, **change: object) -> dict:
    return {"study_uid": study, "structure_key": key, "structure_name": key.title(), "structure_group": group,
            "side": side, "volume_ml": volume, "flags": "", "height_m": 1.6, **grp, **change}


def test_composition_uses_muscles_only_and_falls_back_to_left_plus_right() -> None:
    a = {"fracture_type": "fn"}
    rows = [
        _row("s1", "sartorius", "anterior", "left", 10.0, a), _row("s1", "sartorius", "anterior", "right", 30.0, a),
        _row("s1", "gluteus_maximus", "gluteal", "left", 60.0, a), _row("s1", "gluteus_maximus", "gluteal", "right", 100.0, a),
        _row("s1", "femur", "bone", "left", 500.0, a), _row("s1", "psoas", "other", "left", 80.0, a),
        _row("s2", "sartorius", "anterior", "left", 20.0, a), _row("s2", "gluteus_maximus", "gluteal", "left", 80.0, a),
    ]
    t = composition_table(rows, group_by=("fracture_type",))
    left = {r["structure_key"]: r for r in t if r["side"] == "left"}
    assert left["sartorius"]["n"] == 2
    assert left["sartorius"]["mean_pct"] == pytest.approx(np.mean([100 * 10 / 70, 100 * 20 / 100]))
    assert left["sartorius"]["sd_pct"] == pytest.approx(np.std([100 * 10 / 70, 100 * 20 / 100], ddof=1))
    both = {r["structure_key"]: r for r in t if r["side"] == "both"}
    assert both["sartorius"]["n"] == 1  # s2 has no right side: no "both" for it
    assert both["sartorius"]["mean_pct"] == pytest.approx(100 * 40 / 200)
    assert "femur" not in left and "psoas" not in left
    assert {r["cohort_group"] for r in t} == {"fn"}


def test_loss_tables_sum_compared_muscles_and_exclude_incomplete_sides() -> None:
    def ch(prior: float, current: float, compared: bool = True) -> dict:
        return {"prior_study_uid": "p", "compared": compared, "prior_volume_ml": prior,
                "change_ml": current - prior if compared else None,
                "change_ratio": (current - prior) / prior if compared else None,
                "change_per_height2": (current - prior) / 1.6**2 if compared else None}

    g = {"sex": "F"}
    rows = [
        _row("a", "sartorius", "anterior", "left", 90.0, g, **ch(100.0, 90.0)),
        _row("a", "sartorius", "anterior", "right", 45.0, g, **ch(50.0, 45.0)),
        _row("a", "gluteus_maximus", "gluteal", "left", 380.0, g, **ch(400.0, 380.0)),
        _row("a", "gluteus_maximus", "gluteal", "right", 300.0, g, **ch(300.0, 0.0, compared=False)),
        _row("b", "sartorius", "anterior", "left", 70.0, g, **ch(80.0, 70.0)),
        _row("b", "gluteus_maximus", "gluteal", "left", 350.0, g, **ch(390.0, 350.0)),
        _row("c", "sartorius", "anterior", "left", 70.0, g),  # no comparison: ignored
    ]
    totals = {(t["study_uid"], t["side"]): t for t in study_total_losses(rows, group_by=("sex",))}
    assert totals[("a", "left")]["total_loss_ml"] == pytest.approx(10 + 20)
    assert totals[("a", "left")]["total_loss_ratio_pct"] == pytest.approx(100 * 30 / 500)
    assert totals[("a", "right")]["complete"] is False and totals[("a", "right")]["total_loss_ml"] is None
    assert totals[("a", "both")]["complete"] is False  # gluteus maximus right was not compared
    assert ("c", "left") not in totals
    t2 = {r["side"]: r for r in loss_table(rows, group_by=("sex",))}
    assert t2["left"]["n"] == 2 and t2["left"]["n_excluded"] == 0
    assert t2["left"]["loss_ml_mean"] == pytest.approx(np.mean([30.0, 50.0]))
    assert t2["left"]["loss_ml_std"] == pytest.approx(np.std([30.0, 50.0], ddof=1))
    assert t2["left"]["loss_per_height2_median"] == pytest.approx(np.median([30.0, 50.0]) / 1.6**2)
    assert t2["right"]["n"] == 0 and t2["right"]["n_excluded"] == 1
    t3 = {(r["side"], r["structure_key"]): r for r in per_muscle_loss_table(rows, group_by=("sex",))}
    assert t3[("left", "sartorius")]["mean_loss_ml"] == pytest.approx(np.mean([10.0, 10.0]))
    assert t3[("left", "sartorius")]["mean_loss_ratio_pct"] == pytest.approx(np.mean([10.0, 12.5]))
    assert t3[("both", "sartorius")]["mean_loss_ml"] == pytest.approx(15.0)  # a: left 10 + right 5
    assert t3[("both", "sartorius")]["mean_loss_ratio_pct"] == pytest.approx(100 * 15 / 150)
    assert ("right", "gluteus_maximus") not in t3


def test_format_table_aligns_and_shows_nan() -> None:
    text = format_table([{"group": "a", "n": 3, "mean": 1.234}, {"group": "bb", "n": 12, "mean": math.nan}])
    lines = text.splitlines()
    assert lines[0].split() == ["group", "n", "mean"]
    assert lines[2].split() == ["a", "3", "1.23"] and lines[3].split() == ["bb", "12", "-"]
    assert format_table([]) == "(no rows)"
