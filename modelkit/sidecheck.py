"""One leg atrophied: does a bundle show the loss on that side only?

A held-out phantom subject (subject seed 4000: not in the training, validation or test sets
of config/train_demo.toml, whose subjects are 1000.., 2000.., 3000..) is generated twice:
a prior, and a follow-up of the same subject (another ``scan_seed``: other noise and
texture) in which muscles of the RIGHT leg lost a known fraction of their volume. Both are
segmented with the bundle, measured and compared exactly as the node does
(:func:`pipeline.measure.measure`, :func:`pipeline.compare.compare_studies`). The truth is
the phantoms' own label counts.

The check passes ("the loss shows on that side only") when
* every atrophied muscle shows a loss of at least ``MIN_DETECTED`` of its true loss;
* the left leg's muscles together change by at most ``side_tolerance`` (truth: 0), and so do
  the right leg's non-atrophied muscles;
* the right leg's total loss is larger than the left's.
Separately it reports whether the size of each loss is right: within ``tolerance`` (absolute,
as a fraction of the prior volume) of the true loss ("magnitude").

Usage: thighnode sidecheck [--bundle BUNDLE_DIR] [--spacing 2.0] [--tolerance 0.05] [--side-tolerance 0.02]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.types import PatientInfo, Segmentation, Volume

#: Right-side atrophy of the follow-up (remaining volume fraction), as in tests/pipeline/test_compare.py.
DEFAULT_ATROPHY: dict[str, float] = {
    "vastus_lateralis:right": 0.80,
    "adductor_longus:right": 0.85,
    "gluteus_maximus:right": 0.90,
    "rectus_femoris:right": 0.85,
}
#: Subject seed: phantom_params(PhantomDataSettings(seed=4), 0) -> PhantomParams.seed == 4000.
SUBJECT_SET_SEED = 4
#: An atrophied muscle counts as detected when the model shows at least this fraction of the true loss.
MIN_DETECTED = 0.25


@dataclass(frozen=True)
class SideChange:
    key: str
    side: str
    atrophied: bool
    true_ratio: float  # current/prior - 1 from the phantoms' label counts
    model_ratio: float | None  # from pipeline.compare (None: not compared)
    true_prior_ml: float
    model_prior_ml: float | None


@dataclass(frozen=True)
class SideCheckResult:
    changes: tuple[SideChange, ...]
    true_total: dict[str, float]  # side -> total muscle volume change ratio (truth)
    model_total: dict[str, float]  # side -> total muscle volume change ratio (model)
    tolerance: float
    failures: tuple[str, ...]  # of the side criterion
    magnitude_failures: tuple[str, ...] = ()  # losses off by more than ``tolerance``

    @property
    def passed(self) -> bool:
        """The loss shows on the atrophied side only."""
        return not self.failures

    @property
    def magnitude_ok(self) -> bool:
        return not self.magnitude_failures

    def format_table(self) -> str:
        lines = [f"{'structure':<24}{'side':<7}{'truth %':>9}{'model %':>9}{'error pp':>10}  atrophied"]
        for c in self.changes:
            model = "" if c.model_ratio is None else f"{100 * c.model_ratio:9.2f}"
            err = "" if c.model_ratio is None else f"{100 * (c.model_ratio - c.true_ratio):10.2f}"
            lines.append(f"{c.key:<24}{c.side:<7}{100 * c.true_ratio:9.2f}{model:>9}{err:>10}  {'yes' if c.atrophied else ''}")
        for side in ("right", "left"):
            lines.append(f"{'all muscles':<24}{side:<7}{100 * self.true_total[side]:9.2f}{100 * self.model_total[side]:9.2f}"
                         f"{100 * (self.model_total[side] - self.true_total[side]):10.2f}")
        lines.append("loss on the atrophied side only: " + ("PASSED" if self.passed else "FAILED"))
        lines.extend(f"  - {f}" for f in self.failures)
        lines.append(f"size of each loss within {100 * self.tolerance:.1f} pp of the truth: "
                     + ("yes" if self.magnitude_ok else f"NO ({len(self.magnitude_failures)})"))
        lines.extend(f"  - {f}" for f in self.magnitude_failures)
        return "\n".join(lines)


def _volume(hu: np.ndarray, affine: np.ndarray, tag: str) -> Volume:
    return Volume(
        hu=hu, affine_lps=affine, frame_of_reference_uid=f"2.25.4000{tag}", study_instance_uid=f"2.25.4001{tag}",
        series_instance_uid=f"2.25.4002{tag}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=(),
    )


def _truth_ml(phantom, labels) -> dict[tuple[str, str], float]:
    from modelkit.phantom import ground_truth

    structures = ground_truth(phantom, labels)["structures"]
    return {(key, side): float(v[side]["volume_ml"]) for key, v in structures.items() for side in ("left", "right")}


def sidecheck_params(spacing_mm: float = 2.0, atrophy: Mapping[str, float] | None = None):
    """(prior, follow-up) PhantomParams of the check's subject."""
    from modelkit.train_settings import PhantomDataSettings
    from modelkit.training import phantom_params

    atrophy = dict(DEFAULT_ATROPHY if atrophy is None else atrophy)
    base = phantom_params(PhantomDataSettings(1, SUBJECT_SET_SEED, (spacing_mm,) * 3), 0)
    base = dataclasses.replace(base, atrophy={}, implant=None, fov_top_mm=None, fov_bottom_mm=None)
    return base, dataclasses.replace(base, atrophy=atrophy, scan_seed=base.seed + 1_000_003)


def run_sidecheck(
    bundle_dir: Path,
    *,
    spacing_mm: float = 2.0,
    atrophy: Mapping[str, float] | None = None,
    tolerance: float = 0.05,
    side_tolerance: float = 0.02,
    segmenter=None,  # -> pipeline.inference.Segmenter (injected by tests to share one)
) -> SideCheckResult:
    from modelkit.phantom import generate_phantom
    from pipeline.bundle import load_bundle
    from pipeline.compare import anatomical_profiles, compare_studies
    from pipeline.inference import Segmenter
    from pipeline.labels import load_label_table
    from pipeline.measure import load_measurement_settings, measure

    atrophy = dict(DEFAULT_ATROPHY if atrophy is None else atrophy)
    for key in atrophy:
        if not key.endswith(":right"):
            raise ValueError(f"sidecheck atrophies the right leg only; got {key!r}")
    if segmenter is None:
        segmenter = Segmenter(load_bundle(Path(bundle_dir), load_label_table(), "auto"))
    labels = segmenter.bundle.labels
    base, follow = sidecheck_params(spacing_mm, atrophy)
    settings = load_measurement_settings()
    patient = PatientInfo(sex=base.sex, height_m=base.height_m)

    measured = []
    truths = []
    for tag, params in (("1", base), ("2", follow)):
        phantom = generate_phantom(params, labels)
        volume = _volume(phantom.hu, phantom.affine_lps, tag)
        seg: Segmentation = segmenter.segment(volume)
        measured.append((measure(volume, seg, patient, settings), anatomical_profiles(volume, seg)))
        truths.append(_truth_ml(phantom, labels))
    (prior_m, prior_p), (cur_m, cur_p) = measured
    comparison = compare_studies(cur_m, cur_p, prior_m, prior_p, current_study_date="20250301",
                                 prior_study_date="20240301", prior_study_uid="2.25.40011", height_m=base.height_m)

    changes: list[SideChange] = []
    failures: list[str] = []
    magnitude: list[str] = []
    true_sum = {s: [0.0, 0.0] for s in ("left", "right")}
    model_sum = {s: [0.0, 0.0] for s in ("left", "right")}
    muscles = [label.key for label in labels.labels if not label.is_bone]
    for key in muscles:
        for side in ("right", "left"):
            prior_ml, cur_ml = truths[0][(key, side)], truths[1][(key, side)]
            if prior_ml <= 0:
                continue
            ch = comparison.change(key, side)
            ratio = ch.change_ratio if ch is not None and ch.compared else None
            atrophied = f"{key}:{side}" in atrophy
            true_ratio = cur_ml / prior_ml - 1.0
            changes.append(SideChange(key, side, atrophied, true_ratio, ratio, prior_ml,
                                      None if ch is None else ch.prior_volume_ml))
            true_sum[side][0] += prior_ml
            true_sum[side][1] += cur_ml
            if ch is not None and ch.compared and ch.prior_volume_ml is not None and ch.current_volume_ml is not None:
                model_sum[side][0] += ch.prior_volume_ml
                model_sum[side][1] += ch.current_volume_ml
            if atrophied:
                if ratio is None:
                    failures.append(f"{key} right (atrophied {100 * -true_ratio:.1f} %) was not compared")
                    continue
                if not (ratio < 0 and ratio <= MIN_DETECTED * true_ratio):
                    failures.append(f"{key} right: model change {100 * ratio:.1f} % does not show the true "
                                    f"{100 * true_ratio:.1f} %")
                if not abs(ratio - true_ratio) <= tolerance:
                    magnitude.append(f"{key} right: model change {100 * ratio:.1f} %, true {100 * true_ratio:.1f} %")
    true_total = {s: (v[1] / v[0] - 1.0 if v[0] else 0.0) for s, v in true_sum.items()}
    model_total = {s: (v[1] / v[0] - 1.0 if v[0] else 0.0) for s, v in model_sum.items()}
    failures.extend(_leg_failures(changes, model_total, side_tolerance))
    return SideCheckResult(tuple(changes), true_total, model_total, tolerance, tuple(failures), tuple(magnitude))


def _leg_failures(changes: list[SideChange], model_total: dict[str, float], side_tolerance: float) -> list[str]:
    """What breaks "the loss shows on the atrophied side only": a changed left leg, changed non-atrophied
    right muscles, or a right leg that did not lose more than the left."""
    failures = []
    if abs(model_total["left"]) > side_tolerance:
        failures.append(f"left leg (not atrophied): model total change {100 * model_total['left']:.1f} %")
    right_ok = [c for c in changes if c.side == "right" and not c.atrophied and c.model_ratio is not None]
    p = sum(c.model_prior_ml or 0.0 for c in right_ok)
    if p > 0:
        d = sum((c.model_prior_ml or 0.0) * c.model_ratio for c in right_ok)  # type: ignore[operator]
        if abs(d / p) > side_tolerance:
            failures.append(f"right leg, non-atrophied muscles: model total change {100 * d / p:.1f} %")
    if not model_total["right"] < model_total["left"]:
        failures.append(f"right total change {100 * model_total['right']:.1f} % is not below the left "
                        f"{100 * model_total['left']:.1f} %")
    return failures
