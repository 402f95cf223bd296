"""How well the per-structure uncertainty (pipeline.uncertainty) predicts segmentation errors on labelled
phantoms, and the choice of the low-confidence threshold (``thighnode evaluate --uncertainty``).

Each structure on each side of each case is one row (the "both" rows are left out so that nothing counts
twice). A *failure* is Dice < :data:`FAIL_DICE` or a relative volume error > :data:`FAIL_RAVD`. The
threshold pair (mean entropy, volume CV %) is the one with the highest sensitivity for those failures
among the pairs that leave at least :data:`MIN_SPECIFICITY` of the good structures unflagged on the
calibration cases (a flag that fires on most structures tells nothing); it is then judged on held-out
cases.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from modelkit.evaluation import StructureScore
from pipeline.uncertainty import UncertaintyThresholds

#: What counts as a failed structure (the segmentation issue's targets: Dice 0.85, volume within 5 %).
FAIL_DICE = 0.85
FAIL_RAVD = 0.05


@dataclass(frozen=True)
class FlagPerformance:
    """The low-confidence flag against the failures of a set of rows."""

    n_rows: int
    n_failures: int
    n_flagged: int
    true_positives: int
    sensitivity: float
    specificity: float

    def line(self) -> str:
        return (f"{self.n_flagged} of {self.n_rows} flagged, {self.n_failures} failures; sensitivity "
                f"{self.sensitivity:.2f} ({self.true_positives}/{self.n_failures}), specificity {self.specificity:.2f}")


def scored_rows(scores: Iterable[StructureScore]) -> list[StructureScore]:
    """Per-side rows with an uncertainty summary and a defined Dice and volume error."""
    return [s for s in scores if s.side in ("right", "left") and math.isfinite(s.mean_entropy)
            and math.isfinite(s.dice) and math.isfinite(s.ravd)]


def is_failure(s: StructureScore) -> bool:
    return s.dice < FAIL_DICE or s.ravd > FAIL_RAVD


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value (NaN for fewer than 3 pairs)."""
    if len(x) < 3 or np.ptp(np.asarray(x, dtype=float)) == 0 or np.ptp(np.asarray(y, dtype=float)) == 0:
        return math.nan, math.nan  # undefined for a constant input
    from scipy.stats import spearmanr

    res = spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return float(res.statistic), float(res.pvalue)


def auc(score: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count half); NaN without both classes."""
    s = np.asarray(score, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(s)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def flag_performance(rows: Sequence[StructureScore], thresholds: UncertaintyThresholds) -> FlagPerformance:
    fail = np.array([is_failure(s) for s in rows], dtype=bool)
    flag = np.array([thresholds.is_low_confidence(s.mean_entropy, s.volume_cv_pct) for s in rows], dtype=bool)
    tp = int((fail & flag).sum())
    tn = int((~fail & ~flag).sum())
    n_fail, n_ok = int(fail.sum()), int((~fail).sum())
    return FlagPerformance(len(rows), n_fail, int(flag.sum()), tp,
                           tp / n_fail if n_fail else math.nan, tn / n_ok if n_ok else math.nan)


#: The flag's operating point: at most this share of the calibration's good structures flagged.
MIN_SPECIFICITY = 0.90


def fit_thresholds(rows: Sequence[StructureScore], how_chosen: str = "",
                   min_specificity: float | None = MIN_SPECIFICITY) -> UncertaintyThresholds:
    """The (entropy, volume CV) pair, each from the rows' own percentiles (or off), with the highest
    sensitivity for failures among the pairs whose specificity is at least ``min_specificity`` (None:
    the highest Youden J instead); among equals the one that flags fewest rows."""
    if not rows:
        raise ValueError("no rows with an uncertainty summary to fit a threshold on")
    ent = np.array([s.mean_entropy for s in rows])
    cv = np.array([s.volume_cv_pct for s in rows])
    fail = np.array([is_failure(s) for s in rows], dtype=bool)
    if fail.all() or not fail.any():
        raise ValueError(f"{int(fail.sum())} failures in {len(rows)} rows: need both failures and successes to fit")
    qs = np.linspace(0, 100, 101)
    e_cands = np.unique(np.r_[np.percentile(ent, qs), np.inf])
    c_cands = np.unique(np.r_[np.percentile(cv, qs), np.inf])
    best: tuple[float, int, float, float] | None = None
    for te in e_cands:
        fe = ent > te
        for tc in c_cands:
            flag = fe | (cv > tc)
            sens, spec = flag[fail].mean(), (~flag[~fail]).mean()
            if min_specificity is not None and spec < min_specificity:
                continue
            score = sens if min_specificity is not None else sens + spec - 1.0
            key = (round(float(score), 9), -int(flag.sum()))
            if best is None or key > (best[0], best[1]):
                best = (key[0], key[1], float(te), float(tc))
    assert best is not None  # flagging nothing always has specificity 1
    big = 1e6  # "off": JSON has no infinity
    return UncertaintyThresholds(min(best[2], big), min(best[3], big), how_chosen)


def _correlation_lines(rows: Sequence[StructureScore]) -> list[str]:
    lines = []
    for name, values in (("mean entropy", [s.mean_entropy for s in rows]),
                         ("volume CV %", [s.volume_cv_pct for s in rows])):
        r_d, p_d = spearman(values, [1.0 - s.dice for s in rows])
        r_v, p_v = spearman(values, [s.ravd for s in rows])
        a = auc(values, [is_failure(s) for s in rows])
        lines.append(f"  {name:<13} Spearman vs 1-Dice {r_d:+.3f} (p {p_d:.1e}), vs |volume error| {r_v:+.3f} "
                     f"(p {p_v:.1e}); AUC for failure {a:.3f}")
    return lines


def format_uncertainty_report(scores: Sequence[StructureScore], bundle_dir: Path | None = None) -> str:
    """Rank correlations, the bundle's flag on these cases, and the threshold these cases would give."""
    rows = scored_rows(scores)
    cases = sorted({s.case for s in rows})
    lines = [f"uncertainty (test-time augmentation) vs error: {len(rows)} structure-sides of {len(cases)} cases; "
             f"failure = Dice < {FAIL_DICE} or volume error > {100 * FAIL_RAVD:.0f} %"]
    if not rows:
        return "\n".join(lines + ["  no rows with an uncertainty summary"])
    lines += _correlation_lines(rows)
    if bundle_dir is not None:
        meta = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        thr = UncertaintyThresholds.from_metadata(meta)
        if thr is None:
            lines.append("  the bundle has no low-confidence threshold (metadata.json \"uncertainty\")")
        else:
            lines.append(f"  bundle threshold (entropy > {thr.mean_entropy:.4g} or volume CV > {thr.volume_cv_pct:.4g} %): "
                         + flag_performance(rows, thr).line())
    try:
        fitted = fit_thresholds(rows)
    except ValueError as exc:
        lines.append(f"  no threshold fitted on these cases: {exc}")
    else:
        lines.append(f"  fitted on these cases (max. sensitivity at specificity >= {MIN_SPECIFICITY:.2f}): entropy > {fitted.mean_entropy:.4g} or volume CV > "
                     f"{fitted.volume_cv_pct:.4g} %: " + flag_performance(rows, fitted).line())
    return "\n".join(lines)
