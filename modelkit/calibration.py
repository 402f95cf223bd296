"""Volume calibration of a bundle: per-class factors on the softmax output, fitted on labelled cases.

A segmentation network trained on a coarse model grid has systematic volume biases per
structure: thin muscles lose their edges to the neighbours whose probability wins the argmax
after the restore to the original grid, broad ones gain them. The node reports volumes, so
such a bias is a measurement error. The fix is the classical prior-shift calibration: the
class probabilities are multiplied by per-class factors ``w_c`` (background fixed at 1)
before the restore and argmax, with ``w`` fitted on labelled cases (the validation set,
never the test set) so that the predicted volume of every class, pooled over the cases,
matches its true volume:

    log w_c <- log w_c - log(predicted_c / true_c) / slope_c     (secant steps; see fit_class_weights)

repeated until every class is within 0.5 %, 30 iterations, or 4 rounds without improvement; the
factors of the best round (smallest worst-class error) are kept.

The restore is the node's own (:func:`pipeline.preprocess.restore_probabilities` on each
case's original grid) followed by the node's post-processing (side split, largest components:
:meth:`pipeline.inference.Segmenter.postprocess`), so what is calibrated is exactly what the
node measures, islands the clean-up removes included. Scaling commutes with the linear restore,
so the factors are applied once to the model-grid output.

Usage: thighnode calibrate --bundle BUNDLE_DIR --data DATA_DIR [--iterations 30] [--dry-run]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Factors are kept within [1/MAX_FACTOR, MAX_FACTOR]: a class that needs more is not a bias to calibrate.
MAX_FACTOR = 5.0
#: The fit stops when every class's volume (see OBJECTIVES) is within this fraction of the truth ...
TOLERANCE = 0.005
#: ... or after this many iterations (each restores every case once) ...
MAX_ITERATIONS = 30
#: ... or when this many rounds in a row did not improve on the best one (through the node's clean-up
#: a volume is not a smooth function of its factor: the fit can circle the truth). The best round's
#: factors are returned.
PATIENCE = 4
#: What the factors match to the truth, per class: "pooled" - the volume summed over the cases
#: (large subjects weigh most); "median" - the median over the cases of each case's predicted/true
#: ratio (each subject counts once: what a per-patient volume error sees).
OBJECTIVES = ("pooled", "median")
DEFAULT_OBJECTIVE = "pooled"


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"calibration objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return objective


@dataclass(frozen=True)
class CalibrationResult:
    weights: tuple[float, ...]
    cases: tuple[str, ...]
    #: per case, per class (mL): the truth, and the node's volumes before and after the fit
    true_case_ml: tuple[tuple[float, ...], ...]
    before_case_ml: tuple[tuple[float, ...], ...]
    after_case_ml: tuple[tuple[float, ...], ...]
    iterations: int
    seconds: float
    objective: str = DEFAULT_OBJECTIVE

    @property
    def true_ml(self) -> tuple[float, ...]:
        """Per class, pooled over the cases."""
        return _pooled(self.true_case_ml)

    @property
    def before_ml(self) -> tuple[float, ...]:
        return _pooled(self.before_case_ml)

    @property
    def after_ml(self) -> tuple[float, ...]:
        return _pooled(self.after_case_ml)

    def volume_error(self, which: str = "after") -> dict[int, float]:
        """Pooled relative volume error per class (classes present in the truth)."""
        pred = self.after_ml if which == "after" else self.before_ml
        return {c: abs(p - t) / t for c, (p, t) in enumerate(zip(pred, self.true_ml)) if c > 0 and t > 0}

    def case_error(self, which: str = "after") -> dict[int, float]:
        """Per class, the mean over the cases holding it of each case's relative absolute volume
        error (what ``thighnode evaluate`` reports as RAVD)."""
        pred = np.asarray(self.after_case_ml if which == "after" else self.before_case_ml, dtype=np.float64)
        true = np.asarray(self.true_case_ml, dtype=np.float64)
        out = {}
        for c in range(1, true.shape[1]):
            held = true[:, c] > 0
            if held.any():
                out[c] = float(np.mean(np.abs(pred[held, c] - true[held, c]) / true[held, c]))
        return out

    def provenance(self) -> dict:
        before, after = self.volume_error("before"), self.volume_error("after")
        out = {
            "method": "per-class factors on the softmax output fitted so that "
                      + ("pooled predicted volumes match the truth" if self.objective == "pooled" else
                         "the median over the cases of predicted/true volume is 1")
                      + " (modelkit.calibration)",
            "objective": self.objective,
            "cases": list(self.cases),
            "iterations": self.iterations,
            "pooled_volume_error_before": {str(c): round(v, 5) for c, v in before.items()},
            "pooled_volume_error_after": {str(c): round(v, 5) for c, v in after.items()},
        }
        out["mean_case_volume_error_before"] = {str(c): round(v, 5) for c, v in self.case_error("before").items()}
        out["mean_case_volume_error_after"] = {str(c): round(v, 5) for c, v in self.case_error("after").items()}
        return out


def _pooled(per_case: Sequence[Sequence[float]]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.sum(np.asarray(per_case, dtype=np.float64), axis=0))


def _counts(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(label_map.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)


def fit_class_weights(
    cases: list[tuple[torch.Tensor, object, np.ndarray, float]],
    num_classes: int,
    *,
    iterations: int = MAX_ITERATIONS,
    step: float = 0.8,
    tolerance: float = TOLERANCE,
    finish: Sequence[Callable[[np.ndarray], np.ndarray]] | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    per_case: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``cases``: (model-grid probabilities (C, ...), PreprocessPlan, true volume per class in mL on
    the original grid, voxel volume in mL). Returns (weights, predicted mL before, predicted mL after,
    iterations run), volumes pooled over the cases; ``per_case``, when given, receives the per-case
    volumes (n_cases, C) as "before" and "after". ``objective``: see OBJECTIVES. ``finish``: per case, the node's post-processing
    of the restored label map (side split and largest components: :meth:`Segmenter.postprocess`), so
    that what is fitted is what the node reports; None counts the bare restored argmax.

    Each class's log-factor is moved by a secant step on ``log(predicted / true)``: a confident
    model's volume responds weakly to its factor (the boundary moves little), so a fixed-ratio
    update would stop short of the truth. The first step, and any step whose response is not
    measurably positive, is the damped ratio update; steps are limited to a factor of 2. Stops
    when every present class is within ``tolerance``, after ``iterations``, or after PATIENCE rounds
    without a better worst-class error; returns the best round's weights and volumes."""
    check_objective(objective)
    if finish is not None and len(finish) != len(cases):
        raise ValueError(f"finish has {len(finish)} entries for {len(cases)} cases")
    fit = _VolumeFit(cases, num_classes, objective, list(finish) if finish is not None else [None] * len(cases))
    log_w = np.zeros(num_classes, dtype=np.float64)
    lo, hi = -np.log(MAX_FACTOR), np.log(MAX_FACTOR)
    pred = fit.predicted(log_w)
    before, before_cases = pred.sum(axis=0), pred
    f = fit.misfit(pred)
    err = fit.worst_error(f)
    prev_log_w = prev_f = None
    best = (err, log_w, pred)
    since_best = 0
    done = 0
    for i in range(iterations):
        if err <= tolerance or since_best >= PATIENCE:
            break
        delta = _secant_step(f, log_w, prev_log_w, prev_f, step, fit.present)
        prev_log_w, prev_f = log_w, f
        log_w = np.clip(log_w + delta, lo, hi)
        pred = fit.predicted(log_w)
        f = fit.misfit(pred)
        err = fit.worst_error(f)
        done = i + 1
        logger.info("calibration iteration %d: worst %s volume error %.2f %%", i + 1, objective, 100 * err)
        if err < best[0]:
            best, since_best = (err, log_w, pred), 0
        else:
            since_best += 1
    if per_case is not None:
        per_case["before"], per_case["after"] = before_cases, best[2]
    return np.exp(best[1]), before, best[2].sum(axis=0), done


def _secant_step(f: np.ndarray, log_w: np.ndarray, prev_log_w: np.ndarray | None, prev_f: np.ndarray | None,
                 step: float, present: np.ndarray) -> np.ndarray:
    """The change of the log-factors: a secant step where the volume's response to the factor is measurably
    positive, else the damped ratio update ``-step * f``; 0 for absent classes, limited to a factor of 2."""
    delta = -step * f
    if prev_log_w is not None and prev_f is not None:
        dx, df = log_w - prev_log_w, f - prev_f
        slope = np.divide(df, dx, out=np.zeros_like(df), where=np.abs(dx) > 1e-9)
        secant = slope > 0.02
        delta = np.where(secant, -f / np.where(secant, slope, 1.0), delta)
    return np.clip(np.where(present, delta, 0.0), -np.log(2.0), np.log(2.0))


class _VolumeFit:
    """The node's volumes of the calibration cases under given class factors, and how far they are
    from the truth (per ``objective``)."""

    def __init__(self, cases: list[tuple[torch.Tensor, object, np.ndarray, float]], num_classes: int,
                 objective: str, steps: list[Callable[[np.ndarray], np.ndarray] | None]) -> None:
        self.cases = cases
        self.num_classes = num_classes
        self.objective = objective
        self.steps = steps
        self.true_cases = np.array([c[2] for c in cases], dtype=np.float64).reshape(len(cases), num_classes)
        self.true = self.true_cases.sum(axis=0)
        self.present = (self.true > 0)
        self.present[0] = False

    def label_map(self, i: int, w: np.ndarray) -> np.ndarray:
        from pipeline.inference import scale_classes
        from pipeline.preprocess import restore_probabilities

        probs, plan = self.cases[i][0], self.cases[i][1]
        restored = restore_probabilities(scale_classes(probs, w), plan)
        step = self.steps[i]
        return step(restored) if step is not None else restored

    def predicted(self, lw: np.ndarray) -> np.ndarray:
        """Per case and class, mL (n_cases, C)."""
        w = np.exp(lw)
        return np.array([_counts(self.label_map(i, w), self.num_classes) * self.cases[i][3]
                         for i in range(len(self.cases))])

    def misfit(self, pred: np.ndarray) -> np.ndarray:
        """Per class, the log volume ratio the factor has to remove: of the pooled volumes, or the
        median over the cases holding the class of each case's ratio."""
        if self.objective == "pooled":
            ratio = np.log((pred.sum(axis=0) + 0.01) / (self.true + 0.01))
        else:
            logs = np.log((pred + 0.01) / (self.true_cases + 0.01))
            logs = np.where(self.true_cases > 0, logs, np.nan)
            ratio = np.zeros(self.num_classes)
            ratio[self.present] = np.nanmedian(logs[:, self.present], axis=0)
        return np.where(self.present, ratio, 0.0)

    def worst_error(self, f: np.ndarray) -> float:
        return float(np.max(np.abs(np.expm1(f[self.present])), initial=0.0))


def calibrate_bundle(
    bundle_dir: Path,
    data_dir: Path | Sequence[Path],
    *,
    iterations: int = MAX_ITERATIONS,
    write: bool = True,
    device: str = "auto",
    objective: str = DEFAULT_OBJECTIVE,
) -> CalibrationResult:
    """Fit the class weights of ``bundle_dir`` on the labelled cases of ``data_dir`` (one folder or
    several, each of NIfTI pairs or of DICOM CT + SEG case folders) and (``write``) store them in the bundle's metadata. Existing weights are ignored
    (refitted from 1). ``objective``: see OBJECTIVES (checked before any case is segmented)."""
    check_objective(objective)
    from modelkit.casefolders import DataFolderError, list_folders, load_case_volume
    from modelkit.nifti import data_folders
    from pipeline.bundle import load_bundle, set_class_weights
    from pipeline.inference import Segmenter
    from pipeline.labels import load_label_table

    started = time.monotonic()
    labels = load_label_table()
    bundle = load_bundle(Path(bundle_dir), labels, device)
    segmenter = Segmenter(bundle, device=device)
    n = labels.num_classes
    prepared = []
    finish = []
    names = []
    for case in list_folders(data_folders(data_dir)):
        volume, truth = load_case_volume(case, labels)
        probs, plan = segmenter.predict(volume)
        ml = volume.voxel_volume_ml
        prepared.append((probs, plan, _counts(truth, n) * ml, ml))
        finish.append(lambda lm, affine=volume.affine_lps: segmenter.postprocess(lm, affine)[0])
        names.append(case.name)
        logger.info("calibration case %s predicted", case.name)
    if not prepared:
        raise DataFolderError(f"calibration data {data_dir} holds no labelled cases")
    per_case: dict = {}
    weights, _, _, done = fit_class_weights(prepared, n, iterations=iterations, finish=finish,
                                            objective=objective, per_case=per_case)

    def rows(a) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(float(v) for v in row) for row in np.asarray(a))

    result = CalibrationResult(
        tuple(float(w) for w in weights), tuple(names),
        rows([p[2] for p in prepared]), rows(per_case["before"]), rows(per_case["after"]),
        done, time.monotonic() - started, objective,
    )
    if write:
        set_class_weights(Path(bundle_dir), result.weights, result.provenance())
    return result


def format_result(result: CalibrationResult, labels=None) -> str:
    from pipeline.labels import load_label_table

    labels = labels or load_label_table()
    before, after = result.volume_error("before"), result.volume_error("after")
    case_before, case_after = result.case_error("before"), result.case_error("after")
    lines = [f"calibrated on {len(result.cases)} cases in {result.seconds:.0f} s ({result.iterations} iterations, "
             f"objective {result.objective})",
             "volume error %: pooled over the cases, and the mean over the cases of each case's error",
             f"{'structure':<24}{'factor':>8}{'pooled before':>15}{'after':>8}{'per case before':>17}{'after':>8}"]

    def pct(d: dict[int, float], c: int) -> str:
        return f"{100 * d[c]:.2f}" if c in d else "-"

    for label in labels.labels:
        if label.id in before:
            lines.append(f"{label.key:<24}{result.weights[label.id]:>8.3f}{pct(before, label.id):>15}"
                         f"{pct(after, label.id):>8}{pct(case_before, label.id):>17}{pct(case_after, label.id):>8}")

    def mean(d: dict[int, float]) -> str:
        return f"{100 * float(np.mean(list(d.values()))):.2f}" if d else "-"

    if before:
        lines.append(f"{'MEAN':<24}{'':>8}{mean(before):>15}{mean(after):>8}{mean(case_before):>17}"
                     f"{mean(case_after):>8}")
    return "\n".join(lines)
