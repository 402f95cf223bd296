"""Two bundles on the same labelled cases (``thighnode model compare``): a candidate site model against the
node's deployed one.

Each case is loaded once and segmented by both models exactly as the node segments (pipeline.inference:
calibration factors, restore to the case's grid, side split, largest components); both are scored with
:func:`modelkit.evaluation.score_case` (Dice, relative absolute volume difference) per structure and side,
and the result holds one :class:`~modelkit.evaluation.EvaluationReport` per model.

Uncertainty calibration: with ``uncertainty_samples`` >= 2 both models also draw the node's test-time
augmentations (pipeline.uncertainty); per model, :func:`uncertainty_calibration` says how well its
per-structure uncertainty predicts its own failures on these cases (modelkit.uncertainty_eval: Spearman
rank correlation of the mean entropy with 1 - Dice, AUC for failure, and the sensitivity and
specificity of the bundle's own low-confidence flag).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from modelkit.casefolders import LabelledCase, load_case_volume
from modelkit.evaluation import EvaluationReport, StructureScore, score_case, with_uncertainty
from pipeline.labels import LabelTable

logger = logging.getLogger(__name__)

SIDES = ("right", "left")
#: Differences smaller than these count as a tie in the summary.
DICE_TIE = 0.001
VOLUME_ERROR_TIE_PCT = 0.1


@dataclass(frozen=True)
class ModelIdentity:
    """A compared model: what it is and where it came from (``role`` "candidate" or "deployed"; ``source``
    "promoted" / "configured" for the deployed one, "" for the candidate)."""

    role: str
    name: str
    version: str
    sha256: str
    path: str
    source: str = ""


def truth_sides(truth: np.ndarray, affine_lps: np.ndarray, labels: LabelTable) -> np.ndarray:
    """The ground truth's side map, split at the midline as the node splits its own labels (as `evaluate`)."""
    from pipeline.postprocess import split_sides

    femur_id = next((l.id for l in labels.labels if l.key == "femur"), None)
    return split_sides(truth, affine_lps, femur_id=femur_id)


def uncertainty_calibration(scores: Sequence[StructureScore], thresholds: Any | None) -> dict[str, float | None] | None:
    """How well a model's per-structure uncertainty predicts its failures (Dice < 0.85 or volume error > 5 %)
    on these cases: Spearman of mean entropy vs 1 - Dice, AUC of the entropy for failure, and the bundle's
    low-confidence flag (``thresholds``: pipeline.uncertainty.UncertaintyThresholds, None when the bundle
    has none). None when the scores carry no uncertainty (compared without test-time augmentation)."""
    from modelkit.uncertainty_eval import auc, flag_performance, is_failure, scored_rows, spearman

    rows = scored_rows(scores)
    if not rows:
        return None
    entropy = [r.mean_entropy for r in rows]
    out: dict[str, float | None] = {
        "structure_sides": float(len(rows)),
        "failures": float(sum(is_failure(r) for r in rows)),
        "spearman_entropy_vs_dice_loss": spearman(entropy, [1.0 - r.dice for r in rows])[0],
        "auc_entropy_for_failure": auc(entropy, [is_failure(r) for r in rows]),
        "flag_sensitivity": None,
        "flag_specificity": None,
    }
    if thresholds is not None:
        perf = flag_performance(rows, thresholds)
        out["flag_sensitivity"], out["flag_specificity"] = perf.sensitivity, perf.specificity
    return out


@dataclass(frozen=True)
class ComparisonRow:
    """One structure and side: mean Dice and mean volume error (|V_pred - V_true| / V_true, %) of each model
    over the same cases, those whose ground truth has the structure on that side (``cases``; NaN when none).
    A structure a model labels where the truth has none is counted apart (``*_false_positives``)."""

    key: str
    side: str
    deployed_dice: float
    candidate_dice: float
    deployed_volume_error_pct: float
    candidate_volume_error_pct: float
    cases: int = 0
    deployed_false_positives: int = 0
    candidate_false_positives: int = 0

    @property
    def dice_change(self) -> float:
        return self.candidate_dice - self.deployed_dice


@dataclass(frozen=True)
class ModelComparison:
    """Candidate and deployed model scored on the same cases."""

    candidate: ModelIdentity
    deployed: ModelIdentity
    cases: tuple[str, ...]
    candidate_report: EvaluationReport
    deployed_report: EvaluationReport
    #: Per model role: :func:`uncertainty_calibration` over all cases (None: compared without uncertainty).
    uncertainty: dict[str, dict[str, float | None] | None]

    def rows(self) -> list[ComparisonRow]:
        """Per structure (label table order) and side (right, then left)."""
        by_role = {role: _by_structure_side(report.scores)
                   for role, report in (("deployed", self.deployed_report), ("candidate", self.candidate_report))}
        keys = list(dict.fromkeys(s.key for s in self.deployed_report.scores))
        out = []
        for side in SIDES:
            for key in keys:
                dep, cand = by_role["deployed"].get((key, side), []), by_role["candidate"].get((key, side), [])
                out.append(ComparisonRow(
                    key, side, _present_mean(dep, "dice"), _present_mean(cand, "dice"),
                    100 * _present_mean(dep, "ravd"), 100 * _present_mean(cand, "ravd"),
                    cases=sum(1 for s in dep if s.true_volume_ml > 0),
                    deployed_false_positives=_false_positives(dep), candidate_false_positives=_false_positives(cand),
                ))
        return out

    def means(self) -> dict[str, dict[str, float | None]]:
        """Per role: mean Dice and mean volume error % over the structure-side rows present, and structures
        labelled where the truth has none."""
        rows = self.rows()
        out: dict[str, dict[str, float | None]] = {}
        for role in ("deployed", "candidate"):
            dice = [getattr(r, f"{role}_dice") for r in rows]
            vol = [getattr(r, f"{role}_volume_error_pct") for r in rows]
            out[role] = {
                "dice": _nanmean(dice),
                "volume_error_pct": _nanmean(vol),
                "false_positives": float(sum(getattr(r, f"{role}_false_positives") for r in rows)),
            }
        return out

    def verdict(self) -> str:
        """"candidate", "deployed", "mixed" (each better on one measure) or "tie"."""
        m = self.means()
        dice = m["candidate"]["dice"] - m["deployed"]["dice"]  # type: ignore[operator]
        vol = m["candidate"]["volume_error_pct"] - m["deployed"]["volume_error_pct"]  # type: ignore[operator]
        dice_says = 0 if not abs(dice) >= DICE_TIE else (1 if dice > 0 else -1)
        vol_says = 0 if not abs(vol) >= VOLUME_ERROR_TIE_PCT else (1 if vol < 0 else -1)
        if dice_says >= 0 and vol_says >= 0 and (dice_says or vol_says):
            return "candidate"
        if dice_says <= 0 and vol_says <= 0 and (dice_says or vol_says):
            return "deployed"
        return "tie" if not (dice_says or vol_says) else "mixed"

    def summary(self) -> str:
        m = self.means()
        c, d = m["candidate"], m["deployed"]
        rows = self.rows()
        dice_better = sum(1 for r in rows if r.dice_change >= DICE_TIE)
        dice_worse = sum(1 for r in rows if r.dice_change <= -DICE_TIE)
        figures = (f"mean Dice {c['dice']:.3f} vs {d['dice']:.3f} ({c['dice'] - d['dice']:+.3f}), "  # type: ignore[operator]
                   f"mean volume error {c['volume_error_pct']:.2f} % vs {d['volume_error_pct']:.2f} % "
                   f"({c['volume_error_pct'] - d['volume_error_pct']:+.2f} pp); Dice better in {dice_better}, worse in "  # type: ignore[operator]
                   f"{dice_worse} of {sum(1 for r in rows if r.cases)} structure-sides, over {len(self.cases)} case(s); "
                   f"structures labelled where the truth has none: {c['false_positives']:.0f} vs "
                   f"{d['false_positives']:.0f}")
        head = {
            "candidate": "candidate is better",
            "deployed": "deployed model is better",
            "mixed": "mixed: neither is better on both Dice and volume error",
            "tie": "no difference",
        }[self.verdict()]
        return f"{head}: {figures}"

    def format_table(self) -> str:
        c, d = self.candidate, self.deployed
        lines = [
            f"candidate: {c.name} {c.version}  sha256 {c.sha256[:12]}  ({c.path})",
            f"deployed:  {d.name} {d.version}  sha256 {d.sha256[:12]}  ({d.source}: {d.path})",
            f"cases ({len(self.cases)}): {', '.join(self.cases)}",
            "",
            f"{'structure':<24}{'side':<7}{'Dice dep':>9}{'Dice cand':>10}{'change':>8}"
            f"{'vol err % dep':>15}{'vol err % cand':>16}{'cases':>7}{'FP dep/cand':>13}",
        ]
        for r in self.rows():
            lines.append(
                f"{r.key:<24}{r.side:<7}{_f(r.deployed_dice, 3):>9}{_f(r.candidate_dice, 3):>10}"
                f"{_f(r.dice_change, 3, sign=True):>8}{_f(r.deployed_volume_error_pct, 2):>15}"
                f"{_f(r.candidate_volume_error_pct, 2):>16}{r.cases:>7}"
                f"{f'{r.deployed_false_positives}/{r.candidate_false_positives}':>13}"
            )
        m = self.means()
        lines.append(
            f"{'MEAN':<31}{_f(m['deployed']['dice'], 3):>9}{_f(m['candidate']['dice'], 3):>10}"
            f"{_f(m['candidate']['dice'] - m['deployed']['dice'], 3, sign=True):>8}"  # type: ignore[operator]
            f"{_f(m['deployed']['volume_error_pct'], 2):>15}{_f(m['candidate']['volume_error_pct'], 2):>16}"
        )
        lines += self._uncertainty_lines()
        lines.append(self.summary())
        return "\n".join(lines)

    def _uncertainty_lines(self) -> list[str]:
        if all(self.uncertainty.get(role) is None for role in ("deployed", "candidate")):
            return ["uncertainty calibration: not measured (compared with --uncertainty 0)"]
        lines = []
        for role in ("deployed", "candidate"):
            u = self.uncertainty.get(role)
            if u is None:
                lines.append(f"uncertainty calibration, {role}: not measured")
                continue
            lines.append(
                f"uncertainty calibration, {role}: {u['failures']:.0f} failures in {u['structure_sides']:.0f} "
                f"structure-sides; entropy vs 1-Dice Spearman {_f(u['spearman_entropy_vs_dice_loss'], 2)}, AUC for "
                f"failure {_f(u['auc_entropy_for_failure'], 2)}; low-confidence flag sensitivity "
                f"{_f(u['flag_sensitivity'], 2)}, specificity {_f(u['flag_specificity'], 2)}"
                + ("" if u["flag_sensitivity"] is not None else " (the bundle has no threshold)"))
        return lines

    def to_record(self) -> dict[str, Any]:
        m = self.means()
        return {
            "candidate": vars(self.candidate),
            "deployed": vars(self.deployed),
            "cases": list(self.cases),
            "rows": [
                {"key": r.key, "side": r.side, "deployed_dice": _j(r.deployed_dice),
                 "candidate_dice": _j(r.candidate_dice), "dice_change": _j(r.dice_change),
                 "deployed_volume_error_pct": _j(r.deployed_volume_error_pct),
                 "candidate_volume_error_pct": _j(r.candidate_volume_error_pct), "cases": r.cases,
                 "deployed_false_positives": r.deployed_false_positives,
                 "candidate_false_positives": r.candidate_false_positives}
                for r in self.rows()
            ],
            "means": {role: {k: _j(v) for k, v in values.items()} for role, values in m.items()},
            "uncertainty_calibration": {role: None if u is None else {k: _j(v) for k, v in u.items()}
                                        for role, u in self.uncertainty.items()},
            "verdict": self.verdict(),
            "summary": self.summary(),
        }


def _by_structure_side(scores: Sequence[StructureScore]) -> dict[tuple[str, str], list[StructureScore]]:
    out: dict[tuple[str, str], list[StructureScore]] = {}
    for s in scores:
        out.setdefault((s.key, s.side), []).append(s)
    return out


def _present_mean(scores: Sequence[StructureScore], field: str) -> float:
    """Mean of ``field`` over the cases whose truth has the structure (NaN when none has)."""
    return _nanmean([getattr(s, field) for s in scores if s.true_volume_ml > 0])


def _false_positives(scores: Sequence[StructureScore]) -> int:
    """Cases where the model labels the structure and the truth has none."""
    return sum(1 for s in scores if s.true_volume_ml == 0 and s.pred_volume_ml > 0)


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _f(value: float | None, digits: int, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _j(value: float | None) -> float | None:
    """JSON-safe: NaN becomes null."""
    return None if value is None or math.isnan(value) else round(float(value), 6)


def compare_bundles(
    candidate_dir: Path,
    deployed_dir: Path,
    cases: Sequence[LabelledCase],
    *,
    deployed_source: str = "",
    labels: LabelTable | None = None,
    device: str = "auto",
    uncertainty_samples: int = 2,
) -> ModelComparison:
    """Segment every case with both bundles (each loaded once, refused like the node refuses a bundle) and
    score them on the same ground truth; ``uncertainty_samples`` >= 2 also draws the node's test-time
    augmentations and scores each model's uncertainty (0: not measured, half the time)."""
    from pipeline.bundle import load_bundle
    from pipeline.inference import Segmenter, select_device
    from pipeline.labels import load_label_table

    if not cases:
        raise ValueError("no case to compare on")
    labels = labels or load_label_table()
    dev = select_device(device)
    models = {}
    for role, path in (("deployed", deployed_dir), ("candidate", candidate_dir)):
        bundle = load_bundle(Path(path), labels, dev)
        identity = ModelIdentity(role, bundle.name, bundle.version, bundle.weights_sha256, str(path),
                                 deployed_source if role == "deployed" else "")
        models[role] = (identity, Segmenter(bundle, device=str(dev), uncertainty="tta" if uncertainty_samples else "off",
                                            uncertainty_samples=max(2, uncertainty_samples)))
    scores: dict[str, list[StructureScore]] = {"deployed": [], "candidate": []}
    seconds = {"deployed": 0.0, "candidate": 0.0}
    for number, case in enumerate(cases, start=1):
        volume, truth = load_case_volume(case, labels)
        sides = truth_sides(truth, volume.affine_lps, labels)
        for role, (_, segmenter) in models.items():
            started = time.monotonic()
            seg = segmenter.segment(volume)
            seconds[role] += time.monotonic() - started
            case_scores = score_case(case.name, seg.label_map, truth, labels, volume.voxel_volume_ml, seg.side_map, sides)
            if seg.uncertainty is not None:
                case_scores = [with_uncertainty(s, seg.uncertainty.for_structure(s.label_id, s.side))
                               for s in case_scores]
            scores[role].extend(case_scores)
        logger.info("compared on case %d of %d", number, len(cases))
    names = tuple(c.name for c in cases)
    reports = {
        role: EvaluationReport(identity.name, identity.version, names, tuple(scores[role]),
                               seconds[role] / len(cases))
        for role, (identity, _) in models.items()
    }
    uncertainty = {role: uncertainty_calibration(scores[role], segmenter.uncertainty_thresholds)
                   for role, (_, segmenter) in models.items()}
    return ModelComparison(models["candidate"][0], models["deployed"][0], names, reports["candidate"],
                           reports["deployed"], uncertainty)
