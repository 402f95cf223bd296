"""Segmentation metrics (the paper's Dice and relative absolute volume difference) and bundle evaluation
(``thighnode evaluate``)."""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.labels import LabelTable
from pipeline.types import SIDE_LEFT, SIDE_NAMES, SIDE_RIGHT

logger = logging.getLogger(__name__)


def _counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: voxels in pred, in truth, and in both."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    p = np.asarray(pred, dtype=np.int64).ravel()
    t = np.asarray(truth, dtype=np.int64).ravel()
    n_pred = np.bincount(p, minlength=num_classes)[:num_classes]
    n_true = np.bincount(t, minlength=num_classes)[:num_classes]
    both = np.bincount(p[p == t], minlength=num_classes)[:num_classes]
    return n_pred, n_true, both


def dice_per_structure(pred: np.ndarray, truth: np.ndarray, label_ids: list[int] | tuple[int, ...]) -> dict[int, float]:
    """Dice 2|P∩T| / (|P|+|T|) per label id; NaN when the structure is in neither."""
    n = max(max(label_ids, default=0), int(np.max(pred, initial=0)), int(np.max(truth, initial=0))) + 1
    n_pred, n_true, both = _counts(pred, truth, n)
    out: dict[int, float] = {}
    for i in label_ids:
        denom = n_pred[i] + n_true[i]
        out[int(i)] = float(2.0 * both[i] / denom) if denom else math.nan
    return out


def ravd_per_structure(pred: np.ndarray, truth: np.ndarray, label_ids: list[int] | tuple[int, ...]) -> dict[int, float]:
    """Relative absolute volume difference |V_pred - V_true| / V_true per label id
    (a fraction: 0.05 = 5 %); NaN when the structure is absent from the truth."""
    n = max(max(label_ids, default=0), int(np.max(pred, initial=0)), int(np.max(truth, initial=0))) + 1
    n_pred, n_true, _ = _counts(pred, truth, n)
    return {int(i): float(abs(n_pred[i] - n_true[i]) / n_true[i]) if n_true[i] else math.nan for i in label_ids}


@dataclass(frozen=True)
class StructureScore:
    """One case x structure (x side: "both", "right", "left")."""

    case: str
    label_id: int
    key: str
    side: str
    dice: float
    ravd: float
    true_volume_ml: float
    pred_volume_ml: float
    #: Test-time augmentation summaries (pipeline.uncertainty); NaN when not measured or not segmented.
    mean_entropy: float = math.nan
    volume_cv_pct: float = math.nan
    low_confidence: bool = False


#: Acceptance targets of the segmentation issue (held-out phantoms).
MIN_MEAN_DICE = 0.90
MAX_MUSCLE_RAVD = 0.05


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of a bundle on a data set."""

    bundle_name: str
    bundle_version: str
    cases: tuple[str, ...]
    scores: tuple[StructureScore, ...]
    seconds_per_case: float

    def _rows(self, side: str = "both") -> list[StructureScore]:
        return [s for s in self.scores if s.side == side]

    def mean_dice(self) -> float:
        """Mean over cases and structures (sides together) of Dice."""
        vals = [s.dice for s in self._rows() if not math.isnan(s.dice)]
        return float(np.mean(vals)) if vals else math.nan

    def per_structure(self, side: str = "both") -> dict[str, tuple[float, float, float]]:
        """key -> (mean Dice, mean RAVD, max RAVD) over cases."""
        out: dict[str, tuple[float, float, float]] = {}
        keys = list(dict.fromkeys(s.key for s in self.scores))
        for key in keys:
            rows = [s for s in self._rows(side) if s.key == key]
            dice = [s.dice for s in rows if not math.isnan(s.dice)]
            ravd = [s.ravd for s in rows if not math.isnan(s.ravd)]
            out[key] = (
                float(np.mean(dice)) if dice else math.nan,
                float(np.mean(ravd)) if ravd else math.nan,
                float(np.max(ravd)) if ravd else math.nan,
            )
        return out

    def format_table(self) -> str:
        lines = [
            f"bundle {self.bundle_name} {self.bundle_version}: {len(self.cases)} cases, {self.seconds_per_case:.1f} s/case",
            f"{'structure':<24}{'Dice':>8}{'RAVD %':>9}{'max RAVD %':>12}{'Dice R':>8}{'Dice L':>8}",
        ]
        right, left = self.per_structure("right"), self.per_structure("left")
        for key, (dice, ravd, ravd_max) in self.per_structure().items():
            lines.append(
                f"{key:<24}{dice:>8.3f}{100 * ravd:>9.2f}{100 * ravd_max:>12.2f}"
                f"{right.get(key, (math.nan,))[0]:>8.3f}{left.get(key, (math.nan,))[0]:>8.3f}"
            )
        both = self.per_structure()
        mean_ravd = np.nanmean([v[1] for v in both.values()]) if both else math.nan
        lines.append(f"{'MEAN':<24}{self.mean_dice():>8.3f}{100 * mean_ravd:>9.2f}")
        lines.extend(self.target_lines())
        return "\n".join(lines)

    def target_shortfalls(self, muscle_keys: set[str] | None = None, min_mean_dice: float = MIN_MEAN_DICE,
                          max_ravd: float = MAX_MUSCLE_RAVD) -> list[str]:
        """What misses the acceptance targets: mean Dice over all structures >= ``min_mean_dice``, and
        for every muscle (bones excluded) a mean volume error over cases <= ``max_ravd``."""
        if muscle_keys is None:
            from pipeline.labels import load_label_table

            muscle_keys = {l.key for l in load_label_table().labels if not l.is_bone}
        out = []
        if not self.mean_dice() >= min_mean_dice:
            out.append(f"mean Dice {self.mean_dice():.3f} < {min_mean_dice:.2f}")
        for key, (_, ravd, _) in self.per_structure().items():
            if key in muscle_keys and not math.isnan(ravd) and not ravd <= max_ravd:  # nan: absent in every case
                out.append(f"{key}: volume error {100 * ravd:.1f} % > {100 * max_ravd:.0f} %")
        return out

    def target_lines(self) -> list[str]:
        short = self.target_shortfalls()
        head = (f"targets (mean Dice >= {MIN_MEAN_DICE:.2f}; volume error <= {100 * MAX_MUSCLE_RAVD:.0f} % "
                f"for every muscle): " + ("MET" if not short else f"NOT MET ({len(short)})"))
        return [head] + [f"  - {s}" for s in short]

    def write_csv(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "label_id", "key", "side", "dice", "ravd", "true_volume_ml", "pred_volume_ml",
                             "mean_entropy", "volume_cv_pct", "low_confidence"])
            for s in self.scores:
                writer.writerow([s.case, s.label_id, s.key, s.side, f"{s.dice:.6f}", f"{s.ravd:.6f}",
                                 f"{s.true_volume_ml:.3f}", f"{s.pred_volume_ml:.3f}",
                                 f"{s.mean_entropy:.6f}", f"{s.volume_cv_pct:.4f}", int(s.low_confidence)])
        return path


def score_case(
    case: str,
    pred: np.ndarray,
    truth: np.ndarray,
    labels: LabelTable,
    voxel_volume_ml: float,
    pred_sides: np.ndarray | None = None,
    true_sides: np.ndarray | None = None,
) -> list[StructureScore]:
    """Scores of one case for every structure (and per side when side maps are given)."""
    ids = [l.id for l in labels.labels]
    variants: list[tuple[str, np.ndarray, np.ndarray]] = [("both", pred, truth)]
    if pred_sides is not None and true_sides is not None:
        for side in (SIDE_RIGHT, SIDE_LEFT):
            variants.append((SIDE_NAMES[side], np.where(pred_sides == side, pred, 0), np.where(true_sides == side, truth, 0)))
    out: list[StructureScore] = []
    for side, p, t in variants:
        n = labels.num_classes
        n_pred, n_true, _ = _counts(p, t, n)
        dice = dice_per_structure(p, t, ids)
        ravd = ravd_per_structure(p, t, ids)
        for l in labels.labels:
            out.append(StructureScore(case, l.id, l.key, side, dice[l.id], ravd[l.id],
                                      float(n_true[l.id] * voxel_volume_ml), float(n_pred[l.id] * voxel_volume_ml)))
    return out


def with_uncertainty(score: StructureScore, u) -> StructureScore:
    if u is None:
        return score
    return replace(score, mean_entropy=u.mean_entropy, volume_cv_pct=u.volume_cv_pct, low_confidence=u.low_confidence)


def _case_names(listed: list) -> list[str]:
    """Case names of one report: as they are from one folder; from several, prefixed with the folder's
    name (its path where two folders share a name), so pooled cases never collide."""
    folders = {d for d, _ in listed}
    if len(folders) <= 1:
        return [c.name for _, c in listed]
    short = {d.name for d in folders}
    full = len(short) < len(folders)
    return [f"{d if full else d.name}/{c.name}" for d, c in listed]


def pooled_cases(data_dir: Path | Sequence[Path] = (), case_dirs: Sequence[Path] = ()) -> list:
    """The labelled cases (:class:`modelkit.casefolders.LabelledCase`) of the folders ``data_dir`` (NIfTI pairs
    or DICOM case folders) and of the DICOM case folders ``case_dirs`` (e.g. a node's held-out corrected cases,
    :func:`modelkit.sitecases.held_out_cases`), every folder listed and checked before any case is read;
    named as :func:`evaluate_bundle` names them (with their folder's name when several folders are pooled)."""
    from dataclasses import replace

    from modelkit.casefolders import dicom_case, list_labelled_cases
    from modelkit.nifti import data_folders

    listed = [(d, c) for d in data_folders(data_dir) for c in list_labelled_cases(d)]
    listed += [(Path(c).parent, dicom_case(Path(c))) for c in case_dirs]
    return [replace(c, name=name) for (_, c), name in zip(listed, _case_names(listed))]


def evaluate_bundle(
    bundle_dir: Path,
    data_dir: Path | Sequence[Path],
    *,
    csv_path: Path | None = None,
    labels: LabelTable | None = None,
    device: str = "auto",
    uncertainty_samples: int = 0,
    overlap: float | None = None,
    precision: str | None = None,
) -> EvaluationReport:
    """Segment every labelled case of ``data_dir`` (one folder or several, pooled in one report; each a
    folder of NIfTI pairs, of DICOM case folders, or one DICOM case folder, as
    :func:`modelkit.sitecases.held_out_cases` gives) with the bundle, on each case's own grid, and score it.
    ``uncertainty_samples`` >= 2: also draw that many test-time augmentations (pipeline.uncertainty) and
    record each structure's summaries beside its scores (modelkit.uncertainty_eval relates them to the errors).
    ``overlap``, ``precision``: instead of the bundle's sliding_window settings (None: the bundle's)."""
    from modelkit.casefolders import list_labelled_cases, load_case_volume
    from modelkit.nifti import data_folders
    from pipeline.bundle import load_bundle
    from pipeline.inference import Segmenter, select_device
    from pipeline.labels import load_label_table
    from pipeline.postprocess import split_sides

    labels = labels or load_label_table()
    dev = select_device(device)
    bundle = load_bundle(Path(bundle_dir), labels, dev)
    segmenter = Segmenter(bundle, device=str(dev), uncertainty="tta" if uncertainty_samples else "off",
                          uncertainty_samples=max(2, uncertainty_samples), overlap=overlap, precision=precision)
    logger.info("evaluating %s %s: %s", bundle.name, bundle.version, segmenter.describe())
    femur_id = next((l.id for l in labels.labels if l.key == "femur"), None)
    scores: list[StructureScore] = []
    names: list[str] = []
    started = time.monotonic()
    listed = [(d, c) for d in data_folders(data_dir) for c in list_labelled_cases(d)]  # every folder is listed (and checked) first
    case_names = _case_names(listed)
    for (_, case), case_name in zip(listed, case_names):
        volume, truth = load_case_volume(case, labels)
        seg = segmenter.segment(volume)
        true_sides = split_sides(truth, volume.affine_lps, femur_id=femur_id)
        case_scores = score_case(case_name, seg.label_map, truth, labels, volume.voxel_volume_ml, seg.side_map, true_sides)
        if seg.uncertainty is not None:
            case_scores = [with_uncertainty(s, seg.uncertainty.for_structure(s.label_id, s.side)) for s in case_scores]
        scores.extend(case_scores)
        names.append(case_name)
        both = [s.dice for s in case_scores if s.side == "both" and not math.isnan(s.dice)]
        logger.info("evaluated %s: mean Dice %.4f", case_name, float(np.mean(both)) if both else math.nan)
        report = EvaluationReport(bundle.name, bundle.version, tuple(names), tuple(scores),
                                  (time.monotonic() - started) / max(1, len(names)))
        if csv_path is not None:  # after every case: a long evaluation stopped early keeps what it measured
            report.write_csv(Path(csv_path))
    report = EvaluationReport(bundle.name, bundle.version, tuple(names), tuple(scores),
                              (time.monotonic() - started) / max(1, len(names)))
    if csv_path is not None:
        report.write_csv(Path(csv_path))
    return report
