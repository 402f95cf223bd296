"""How the uncertainty is judged against the errors (modelkit.uncertainty_eval)."""

from __future__ import annotations

import math

import pytest

from modelkit.evaluation import StructureScore
from modelkit.uncertainty_eval import (
    auc,
    fit_thresholds,
    flag_performance,
    format_uncertainty_report,
    is_failure,
    scored_rows,
    spearman,
)
from pipeline.uncertainty import UncertaintyThresholds


def _row(i: int, dice: float, ravd: float, entropy: float, cv: float, side: str = "left") -> StructureScore:
    return StructureScore(f"c{i}", 1, "gracilis", side, dice, ravd, 10.0, 10.0, entropy, cv)


def _rows() -> list[StructureScore]:
    """Entropy rises with the error; failures (Dice < 0.85 or > 5 %) are the three most uncertain."""
    return [
        _row(0, 0.97, 0.01, 0.02, 0.3), _row(1, 0.95, 0.02, 0.03, 0.5), _row(2, 0.93, 0.03, 0.05, 0.4),
        _row(3, 0.90, 0.04, 0.06, 0.9), _row(4, 0.86, 0.07, 0.10, 1.5), _row(5, 0.80, 0.04, 0.14, 0.8),
        _row(6, 0.70, 0.20, 0.25, 6.0),
    ]


def test_failure_definition() -> None:
    assert is_failure(_row(0, 0.84, 0.0, 0, 0)) and is_failure(_row(0, 0.99, 0.051, 0, 0))
    assert not is_failure(_row(0, 0.85, 0.05, 0, 0))


def test_rank_correlation_and_auc() -> None:
    rows = _rows()
    rho, _ = spearman([r.mean_entropy for r in rows], [1 - r.dice for r in rows])
    assert rho == pytest.approx(1.0)
    rho, _ = spearman([r.mean_entropy for r in rows], [r.dice for r in rows])
    assert rho == pytest.approx(-1.0)
    assert auc([0.1, 0.2, 0.3], [False, False, True]) == 1.0
    assert auc([0.3, 0.2, 0.1], [False, False, True]) == 0.0
    assert math.isnan(auc([0.1, 0.2], [True, True]))


def test_fitted_threshold_separates_the_failures_and_flags_them() -> None:
    rows = _rows()
    for rule in (0.9, None):  # specificity >= 0.9, or Youden's J
        thr = fit_thresholds(rows, min_specificity=rule)
        perf = flag_performance(rows, thr)
        assert (perf.n_failures, perf.sensitivity, perf.specificity) == (3, 1.0, 1.0)
        assert 0.06 <= thr.mean_entropy < 0.10 or 0.9 <= thr.volume_cv_pct < 1.5
    none = flag_performance(rows, UncertaintyThresholds(1.0, 100.0))
    assert (none.n_flagged, none.sensitivity, none.specificity) == (0, 0.0, 1.0)
    with pytest.raises(ValueError, match="need both failures and successes"):
        fit_thresholds(rows[:3])


def test_rows_without_uncertainty_or_on_both_sides_are_left_out_and_the_report_reads() -> None:
    rows = _rows() + [_row(9, 0.9, 0.0, math.nan, math.nan), _row(8, 0.9, 0.0, 0.1, 1.0, side="both")]
    assert len(scored_rows(rows)) == 7
    text = format_uncertainty_report(rows)
    assert "7 structure-sides of 7 cases" in text and "Spearman vs 1-Dice +1.000" in text
    assert "fitted on these cases" in text and "sensitivity 1.00 (3/3), specificity 1.00" in text


def test_the_specificity_floor_is_kept_when_failures_cannot_be_separated() -> None:
    """Two failures look certain: the fit flags no more good structures than the floor allows."""
    rows = _rows() + [_row(10 + i, 0.7, 0.2, 0.01, 0.1) for i in range(2)] + [
        _row(20 + i, 0.97, 0.01, 0.01 * i, 0.2) for i in range(20)]
    thr = fit_thresholds(rows, min_specificity=0.9)
    assert flag_performance(rows, thr).specificity >= 0.9
