"""Two bundles on the same labelled cases (``thighnode model compare``): a candidate site model against the
node's deployed one.

Each case is loaded once and segmented by both models exactly as the node segments (pipeline.inference:
calibration factors, restore to the case's grid, side split, largest components); both are scored with
:func:`modelkit.evaluation.score_case` (Dice, relative absolute volume difference) per structure and side,
and the result holds one :class:`~modelkit.evaluation.EvaluationReport` per model.

Uncertainty calibration: :func:`uncertainty_calibration` is the hook for the uncertainty work (issue 23).
While :class:`pipeline.types.Segmentation` carries no per-voxel uncertainty it returns None and the
``calibration_ece`` column stays empty.
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
from modelkit.evaluation import EvaluationReport, StructureScore, score_case
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


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error (Guo et al., ICML 2017): the voxel-weighted mean over ``bins`` equal-width
    confidence bins of |accuracy - mean confidence|. ``confidence`` in [0, 1]; ``correct`` boolean."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"confidence has {conf.size} values, correct has {hit.size}")
    if conf.size == 0:
        return math.nan
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(f"confidence must lie in [0, 1]; saw {conf.min():.3g}..{conf.max():.3g}")
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if n:
            total += n * abs(float(hit[inside].mean()) - float(conf[inside].mean()))
    return total / conf.size


def uncertainty_calibration(segmentation: Any, truth: np.ndarray) -> float | None:
    """HOOK (uncertainty, issue 23): the expected calibration error of a segmentation's per-voxel uncertainty
    on the voxels labelled in the truth or the prediction; None when the segmentation has no uncertainty.

    Expects ``segmentation.uncertainty``: an array on the label map's grid in [0, 1] (1 = no confidence in the
    voxel's label), confidence = 1 - uncertainty, a voxel correct when its label equals the truth's. Today
    no Segmentation has that attribute, so this returns None and the column stays empty."""
    uncertainty = getattr(segmentation, "uncertainty", None)
    if uncertainty is None:
        return None
    uncertainty = np.asarray(uncertainty)
    pred = np.asarray(segmentation.label_map)
    if uncertainty.shape != pred.shape:
        raise ValueError(f"uncertainty shape {uncertainty.shape} differs from the label map's {pred.shape}")
    region = (pred > 0) | (truth > 0)
    return expected_calibration_error(1.0 - uncertainty[region], pred[region] == truth[region])


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
    #: Per model role, per case: the uncertainty's expected calibration error, None without uncertainty.
    calibration_ece: dict[str, dict[str, float | None]]

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
        """Per role: mean Dice and mean volume error % over the structure-side rows present, and the mean
        calibration error (None without uncertainty)."""
        rows = self.rows()
        out: dict[str, dict[str, float | None]] = {}
        for role in ("deployed", "candidate"):
            dice = [getattr(r, f"{role}_dice") for r in rows]
            vol = [getattr(r, f"{role}_volume_error_pct") for r in rows]
            eces = [v for v in self.calibration_ece.get(role, {}).values() if v is not None]
            out[role] = {
                "dice": _nanmean(dice),
                "volume_error_pct": _nanmean(vol),
                "false_positives": float(sum(getattr(r, f"{role}_false_positives") for r in rows)),
                "calibration_ece": float(np.mean(eces)) if eces else None,
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
        lines.append(
            f"uncertainty calibration (ECE): deployed {_f(m['deployed']['calibration_ece'], 3)}, candidate "
            f"{_f(m['candidate']['calibration_ece'], 3)}"
            + ("" if m["deployed"]["calibration_ece"] is not None or m["candidate"]["calibration_ece"] is not None
               else "  (empty: neither model gives an uncertainty)")
        )
        lines.append(self.summary())
        return "\n".join(lines)

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
            "calibration_ece": self.calibration_ece,
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
) -> ModelComparison:
    """Segment every case with both bundles (each loaded once, refused like the node refuses a bundle) and
    score them on the same ground truth."""
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
        models[role] = (identity, Segmenter(bundle, device=str(dev)))
    scores: dict[str, list[StructureScore]] = {"deployed": [], "candidate": []}
    ece: dict[str, dict[str, float | None]] = {"deployed": {}, "candidate": {}}
    seconds = {"deployed": 0.0, "candidate": 0.0}
    for case in cases:
        volume, truth = load_case_volume(case, labels)
        sides = truth_sides(truth, volume.affine_lps, labels)
        for role, (_, segmenter) in models.items():
            started = time.monotonic()
            seg = segmenter.segment(volume)
            seconds[role] += time.monotonic() - started
            scores[role].extend(score_case(case.name, seg.label_map, truth, labels, volume.voxel_volume_ml,
                                           seg.side_map, sides))
            ece[role][case.name] = uncertainty_calibration(seg, truth)
        logger.info("compared on case %d of %d", len(ece["deployed"]), len(cases))
    names = tuple(c.name for c in cases)
    reports = {
        role: EvaluationReport(identity.name, identity.version, names, tuple(scores[role]),
                               seconds[role] / len(cases))
        for role, (identity, _) in models.items()
    }
    return ModelComparison(models["candidate"][0], models["deployed"][0], names, reports["candidate"],
                           reports["deployed"], ece)
