"""Implants at follow-up: is every muscle's change within 5 pp of the truth, or withheld with its reason?

Hip-fracture follow-up CTs carry implants; the model mis-segments muscles near metal, and a false
loss shown as a number is the worst thing the node can tell a clinician. This evaluation
(``thighnode evaluate-implants``) checks :mod:`pipeline.compare`'s metal withholding on phantom
PAIRS: for pair i a held-out subject (``modelkit.training.phantom_params`` with ``seed``; the
training, validation and test sets use seeds 1..3, the side check 4) is scanned twice:

* prior: no implant, no atrophy, whole field of view;
* follow-up: the same subject (same ``seed``, another ``scan_seed``: other noise and texture), with
  known atrophy (two muscles near the hip on the implant side - gluteus medius/minimus, vastus
  lateralis, iliopsoas - and one or two others on either side, each losing 5..25 %) and an implant.

Implant kinds and sides are a parameter (default: all of :data:`KINDS` x :data:`IMPLANT_SIDES`,
cycled over the pairs).

Both scans go through the node's data path in-process, as :mod:`modelkit.sidecheck` runs it
(the bundle's :class:`pipeline.inference.Segmenter` = preprocess, inference, postprocess; then
:func:`pipeline.measure.measure`, :func:`pipeline.compare.anatomical_profiles`,
:func:`pipeline.compare.compare_studies`). The comparison is made twice: with the rule (the given
thresholds) and without it (both thresholds None), so the rule's effect shows.

Truth: the phantoms' label counts per muscle and side (both scans cover the whole anatomy, so
the common range holds every muscle whole): true change % = 100 x (follow-up / prior - 1).
Per muscle and side a row holds the truth, the reported change or the reason it is withheld, the
error in percentage points and the two quantities the rule decides from (the largest share of its
voxels near metal, and in slices holding metal, in either scan), so thresholds can be chosen on
calibration pairs (:func:`choose_thresholds`) and checked on test pairs. With ``uncertainty_samples``
(default 2, the node's ``[model] uncertainty_samples``) the segmenter also draws the node's test-time
augmentations and each row carries the largest TTA volume CV and mean entropy of either scan, so a
rule based on them can be judged on the same rows (2026-12-07, seeds 17/18, 15 pairs each: they did
not separate the wrong changes from the right ones; README, "Implants at follow-up").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkit.phantom_types import IMPLANT_KINDS
from pipeline.types import FLAG_PARTIAL_COMMON_RANGE

logger = logging.getLogger(__name__)

KINDS = IMPLANT_KINDS
IMPLANT_SIDES = ("left", "right", "both")
#: Muscles next to a hip implant (atrophied on the implant side of every pair).
NEAR_MUSCLES = ("gluteus_medius", "gluteus_minimus", "vastus_lateralis", "iliopsoas")
#: Muscles farther from it (atrophied on either side).
OTHER_MUSCLES = ("gluteus_maximus", "rectus_femoris", "adductor_longus", "vastus_medialis", "sartorius")
MAX_ERROR_PP = 5.0
#: Subject set of the calibration pairs; the test pairs use another seed (:data:`TEST_SEED`).
CALIBRATION_SEED = 11
TEST_SEED = 12


@dataclass(frozen=True)
class ImplantPair:
    """The parameters of one pair: prior (no implant) and follow-up (implant, known atrophy)."""

    index: int
    kind: str  # implant kind (modelkit.phantom_types.IMPLANT_KINDS)
    implant_side: str  # "left", "right" or "both"
    prior: object  # modelkit.phantom.PhantomParams
    follow_up: object  # modelkit.phantom.PhantomParams


@dataclass(frozen=True)
class MuscleRow:
    """One muscle on one side of one pair."""

    pair: int
    kind: str
    implant_side: str
    key: str
    side: str
    atrophied: bool
    true_pct: float  # 100 x (follow-up / prior - 1) from the phantoms' labels
    reported_pct: float | None  # with the rule; None: withheld / not compared
    reason: str  # why withheld ("" when shown)
    unruled_pct: float | None  # without the rule (metal_withhold_near_pct=None)
    near_metal_pct: float  # largest share (%) of its voxels near metal in either scan (what the rule uses)
    metal_slices_pct: float = 0.0  # largest share (%) of its voxels in slices holding metal, either scan
    volume_cv_pct: float | None = None  # largest TTA volume CV (%) of either scan (None: uncertainty off)
    mean_entropy: float | None = None  # largest TTA mean voxel entropy (0..1) of either scan
    prior_ml: float | None = None  # the prior's volume inside the common range (without the rule)
    partial: bool = False  # compared over part of it only (flag partial_common_range, without the rule)

    @property
    def error_pp(self) -> float | None:
        return None if self.reported_pct is None else self.reported_pct - self.true_pct

    @property
    def unruled_error_pp(self) -> float | None:
        return None if self.unruled_pct is None else self.unruled_pct - self.true_pct


@dataclass(frozen=True)
class Summary:
    """Counts over the rows: shown values, shown values off by more than ``max_error_pp``, withheld."""

    rows: int
    shown: int
    wrong: int  # shown with |error| > max_error_pp (the target is 0)
    withheld: int
    max_abs_error_pp: float  # over the shown values (0 when none)

    def line(self) -> str:
        return (f"{self.rows} muscle changes: {self.shown} shown, {self.wrong} shown with |error| > "
                f"{MAX_ERROR_PP:g} pp (max {self.max_abs_error_pp:.1f} pp), {self.withheld} withheld")


def summarize(values: Sequence[tuple[float | None, float]], max_error_pp: float = MAX_ERROR_PP) -> Summary:
    """``values``: (reported % or None when withheld, true %) per muscle change."""
    errors = [abs(r - t) for r, t in values if r is not None]
    return Summary(rows=len(values), shown=len(errors), wrong=sum(e > max_error_pp for e in errors),
                   withheld=len(values) - len(errors), max_abs_error_pp=max(errors, default=0.0))


@dataclass(frozen=True)
class ImplantEvaluation:
    """Every row of every pair, with the threshold used and the summaries with and without the rule."""

    bundle: str
    seed: int
    spacing_mm: float
    threshold_pct: float  # near metal
    slices_threshold_pct: float  # in slices holding metal
    pairs: tuple[tuple[int, str, str], ...]  # (index, kind, implant side)
    rows: tuple[MuscleRow, ...]
    seconds_per_pair: float
    withhold_partial: bool = True  # the rule also withholds structures the field of view cuts

    def with_rule(self) -> Summary:
        return summarize([(r.reported_pct, r.true_pct) for r in self.rows])

    def without_rule(self) -> Summary:
        return summarize([(r.unruled_pct, r.true_pct) for r in self.rows])

    def format_table(self) -> str:
        lines = [f"{'pair':<5}{'implant':<16}{'muscle':<22}{'side':<6}{'truth %':>8}{'shown %':>9}{'err pp':>8}"
                 f"{'no rule %':>10}{'near %':>7}{'slices %':>9}  reason"]
        for r in self.rows:
            shown = "withheld" if r.reported_pct is None else f"{r.reported_pct:.1f}"
            err = "" if r.error_pp is None else f"{r.error_pp:+.1f}"
            unruled = "-" if r.unruled_pct is None else f"{r.unruled_pct:.1f}"
            mark = "*" if r.atrophied else " "
            lines.append(f"{r.pair:<5}{r.kind + ' ' + r.implant_side:<16}{r.key:<21}{mark}{r.side:<6}"
                         f"{r.true_pct:>8.1f}{shown:>9}{err:>8}{unruled:>10}{r.near_metal_pct:>7.1f}"
                         f"{r.metal_slices_pct:>9.1f}  {r.reason}")
        lines.append("* atrophied in the follow-up")
        lines.extend(self.summary_lines())
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        chosen = choose_thresholds(self.rows)
        return [
            f"bundle {self.bundle}, {len(self.pairs)} pairs (seed {self.seed}, {self.spacing_mm:g} mm), "
            f"{self.seconds_per_pair:.0f} s/pair",
            f"with the rule (withheld from {self.threshold_pct:g} % of voxels near metal or "
            f"{self.slices_threshold_pct:g} % in slices with metal"
            + ("; and when the field of view cuts the structure" if self.withhold_partial else "")
            + f"): {self.with_rule().line()}",
            f"without the rule: {self.without_rule().line()}",
            "least withholding with no shown error > 5 pp on these pairs: "
            + f"near {_pct(chosen[0])}, slices {_pct(chosen[1])} ({chosen[2]} withheld)"
            + (f"; {chosen[3]} wrong change(s) with no metal near or in their slices: no threshold withholds them"
               if chosen[3] else ""),
        ]

    def to_record(self) -> dict:
        return {
            "bundle": self.bundle, "seed": self.seed, "spacing_mm": self.spacing_mm,
            "threshold_pct": self.threshold_pct, "slices_threshold_pct": self.slices_threshold_pct,
            "withhold_partial": self.withhold_partial,
            "seconds_per_pair": self.seconds_per_pair,
            "pairs": [{"index": i, "kind": k, "implant_side": s} for i, k, s in self.pairs],
            "with_rule": dataclasses.asdict(self.with_rule()),
            "without_rule": dataclasses.asdict(self.without_rule()),
            "least_withholding_thresholds_pct": choose_thresholds(self.rows),
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_record(), indent=1), encoding="utf-8")
        return path


def _pct(value: float | None) -> str:
    return "off" if value is None else f"{value:g} %"


def _withheld_by(row: MuscleRow, near_pct: float | None, slices_pct: float | None) -> bool:
    return (near_pct is not None and row.near_metal_pct >= near_pct) or (
        slices_pct is not None and row.metal_slices_pct >= slices_pct)


def choose_thresholds(rows: Sequence[MuscleRow], max_error_pp: float = MAX_ERROR_PP
                      ) -> tuple[float | None, float | None, int, int]:
    """(near %, slices %, rows withheld, wrong rows no threshold reaches): the thresholds that withhold
    the fewest changes such that no shown change errs by more than ``max_error_pp`` (None: that test
    off; ties: the larger thresholds), except the wrong changes with neither share above 0.1 %, which
    no threshold withholds (counted in the last item; the target is not met when it is not 0).
    Candidates are the observed shares (rounded down to 0.1 %: a threshold equal to a row's share
    withholds it). Rows not compared for other reasons (``unruled_pct`` None) do not count."""
    rows = [r for r in rows if r.unruled_error_pp is not None]
    wrong = [r for r in rows if abs(r.unruled_error_pp) > max_error_pp]  # type: ignore[arg-type]
    unreachable = [r for r in wrong if r.near_metal_pct < 0.1 and r.metal_slices_pct < 0.1]
    wrong = [r for r in wrong if r not in unreachable]

    def candidates(values: list[float]) -> list[float | None]:
        return [None, *sorted({math.floor(v * 10.0) / 10.0 for v in values if v >= 0.1}, reverse=True)]

    best: tuple[int, float, float, float | None, float | None] | None = None
    for near in candidates([r.near_metal_pct for r in wrong]):
        for slices in candidates([r.metal_slices_pct for r in wrong]):
            if any(not _withheld_by(r, near, slices) for r in wrong):
                continue
            n = sum(_withheld_by(r, near, slices) for r in rows)
            key = (n, -(near if near is not None else 101.0), -(slices if slices is not None else 101.0))
            if best is None or key < best[:3]:
                best = (*key, near, slices)
    assert best is not None  # the lowest candidates withhold every reachable wrong change
    return best[3], best[4], best[0], len(unreachable)


def implant_variants(kinds: Sequence[str] = KINDS, sides: Sequence[str] = IMPLANT_SIDES) -> list[tuple[str, str]]:
    """(kind, side) pairs to cycle over: kind and side advance together, so that any run of
    len(kinds) pairs holds every kind (and, with coprime counts, len(kinds) x len(sides) pairs
    every combination)."""
    n = math.lcm(len(kinds), len(sides)) if kinds and sides else 0
    return [(kinds[i % len(kinds)], sides[i % len(sides)]) for i in range(n)]


def pair_params(index: int, seed: int, *, spacing_mm: float = 3.0,
                variants: Sequence[tuple[str, str]] | None = None) -> ImplantPair:
    """Pair ``index`` of the set ``seed``: subject, implant (kind, side cycled over ``variants``) and atrophy."""
    from modelkit.train_settings import PhantomDataSettings
    from modelkit.training import phantom_params

    variants = list(variants) if variants is not None else implant_variants()
    kind, implant_side = variants[index % len(variants)]
    base = phantom_params(PhantomDataSettings(1, seed, (spacing_mm,) * 3), index)
    prior = dataclasses.replace(base, atrophy={}, implant=None, fov_top_mm=None, fov_bottom_mm=None)
    rng = np.random.default_rng([seed, index, 71])
    metal_sides = ["left", "right"] if implant_side == "both" else [implant_side]
    atrophy: dict[str, float] = {}
    for side in metal_sides:
        for i in rng.choice(len(NEAR_MUSCLES), size=2, replace=False):
            atrophy[f"{NEAR_MUSCLES[i]}:{side}"] = round(float(rng.uniform(0.75, 0.95)), 3)
    for i in rng.choice(len(OTHER_MUSCLES), size=int(rng.integers(1, 3)), replace=False):
        side = ("left", "right")[int(rng.integers(2))]
        atrophy[f"{OTHER_MUSCLES[i]}:{side}"] = round(float(rng.uniform(0.75, 0.95)), 3)
    follow = dataclasses.replace(prior, atrophy=atrophy, implant=implant_side, implant_kind=kind,
                                 scan_seed=base.seed + 1_000_003)
    return ImplantPair(index, kind, implant_side, prior, follow)


def true_change_pct(prior_ml: Mapping[tuple[str, str], float], follow_ml: Mapping[tuple[str, str], float]
                    ) -> dict[tuple[str, str], float]:
    """Per (key, side) present in the prior: 100 x (follow-up / prior - 1)."""
    return {k: 100.0 * (follow_ml.get(k, 0.0) / v - 1.0) for k, v in prior_ml.items() if v > 0}


def metal_slices_pct(comparison, current, prior) -> dict[tuple[str, str], float]:  # noqa: ANN001
    """Per (key, side) compared over a common range: pipeline.compare.metal_slices_pct (what its rule
    decides from), from the two studies' AnatomicalProfiles."""
    from pipeline.compare import aligned_profiles
    from pipeline.compare import metal_slices_pct as share

    current, prior = aligned_profiles(current, prior)  # the common range is on the comparison's axis
    return {(c.key, c.side): share(current, prior, c.key, c.side, c.common_range_mm)[0]
            for c in comparison.changes if c.common_range_mm is not None}


def near_metal_pct(*studies) -> dict[tuple[str, str], float]:
    """Per (key, side): the largest share (%) of the structure's voxels near metal over the studies'
    Measurements (what pipeline.compare's rule decides from)."""
    out: dict[tuple[str, str], float] = {}
    for m in studies:
        for s in m.structures:
            if s.side in ("left", "right") and s.voxel_count > 0:
                pct = 100.0 * s.near_metal_voxels / s.voxel_count
                out[(s.key, s.side)] = max(out.get((s.key, s.side), 0.0), pct)
    return out


def uncertainty_of(*studies) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (key, side): the largest TTA volume CV (%) and mean entropy over the studies' Measurements
    (structures without an uncertainty summary are left out)."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for m in studies:
        for s in m.structures:
            if s.side in ("left", "right") and s.uncertainty is not None:
                cv, ent = out.get((s.key, s.side), (0.0, 0.0))
                out[(s.key, s.side)] = (max(cv, s.uncertainty.volume_cv_pct), max(ent, s.uncertainty.mean_entropy))
    return out


def pair_rows(pair: ImplantPair, truth: Mapping[tuple[str, str], float], ruled, unruled,
              near: Mapping[tuple[str, str], float], muscles: Sequence[str],
              slices: Mapping[tuple[str, str], float] | None = None,
              uncertainty: Mapping[tuple[str, str], tuple[float, float]] | None = None) -> list[MuscleRow]:
    """The rows of one pair from the truth and the two comparisons (with and without the rule)."""
    rows = []
    atrophied = set(pair.follow_up.atrophy)  # type: ignore[attr-defined]
    for key in muscles:
        for side in ("right", "left"):
            if (key, side) not in truth:
                continue
            ch, ch0 = ruled.change(key, side), unruled.change(key, side)
            shown = ch is not None and ch.compared and ch.change_ratio is not None
            shown0 = ch0 is not None and ch0.compared and ch0.change_ratio is not None
            rows.append(MuscleRow(
                pair=pair.index, kind=pair.kind, implant_side=pair.implant_side, key=key, side=side,
                atrophied=f"{key}:{side}" in atrophied, true_pct=truth[(key, side)],
                reported_pct=100.0 * ch.change_ratio if shown else None,  # type: ignore[union-attr]
                reason="" if shown else (ch.reason if ch is not None else "not found in either study"),
                unruled_pct=100.0 * ch0.change_ratio if shown0 else None,  # type: ignore[union-attr]
                near_metal_pct=near.get((key, side), 0.0),
                metal_slices_pct=(slices or {}).get((key, side), 0.0),
                volume_cv_pct=(uncertainty or {}).get((key, side), (None, None))[0],
                mean_entropy=(uncertainty or {}).get((key, side), (None, None))[1],
                prior_ml=ch0.prior_volume_ml if ch0 is not None else None,
                partial=ch0 is not None and FLAG_PARTIAL_COMMON_RANGE in ch0.flags,
            ))
    return rows


def _run_pair(pair: ImplantPair, segmenter, settings, thresholds: tuple[float, float], muscles: Sequence[str],
              keep: list | None = None, withhold_partial: bool = True) -> list[MuscleRow]:
    """The rows of one pair; ``keep`` (a list) receives (measurements, profiles) of prior and follow-up."""
    from modelkit.phantom import generate_phantom
    from modelkit.sidecheck import _truth_ml, _volume
    from pipeline.compare import anatomical_profiles, compare_studies
    from pipeline.measure import measure
    from pipeline.types import PatientInfo

    labels = segmenter.bundle.labels
    patient = PatientInfo(sex=pair.prior.sex, height_m=pair.prior.height_m)  # type: ignore[attr-defined]
    studies, truths = [], []
    for tag, params in ((f"{pair.index}1", pair.prior), (f"{pair.index}2", pair.follow_up)):
        phantom = generate_phantom(params, labels)
        volume = _volume(phantom.hu, phantom.affine_lps, tag)
        seg = segmenter.segment(volume)
        studies.append((measure(volume, seg, patient, settings), anatomical_profiles(volume, seg)))
        truths.append(_truth_ml(phantom, labels))
    (prior_m, prior_p), (cur_m, cur_p) = studies
    kw = dict(current_study_date="20250301", prior_study_date="20240301", prior_study_uid=f"2.25.7{pair.index}",
              height_m=patient.height_m)
    if keep is not None:
        keep.extend(studies)
    ruled = compare_studies(cur_m, cur_p, prior_m, prior_p, metal_withhold_near_pct=thresholds[0],
                            metal_withhold_slices_pct=thresholds[1], withhold_partial=withhold_partial, **kw)
    unruled = compare_studies(cur_m, cur_p, prior_m, prior_p, metal_withhold_near_pct=None,
                              metal_withhold_slices_pct=None, **kw)
    return pair_rows(pair, true_change_pct(truths[0], truths[1]), ruled, unruled, near_metal_pct(prior_m, cur_m),
                     muscles, metal_slices_pct(unruled, cur_p, prior_p), uncertainty_of(prior_m, cur_m))


def evaluate_implants(
    bundle_dir: Path,
    *,
    pairs: int = 6,
    seed: int = CALIBRATION_SEED,
    spacing_mm: float = 3.0,
    threshold_pct: float | None = None,
    slices_threshold_pct: float | None = None,
    variants: Sequence[tuple[str, str]] | None = None,
    uncertainty_samples: int = 2,
    withhold_partial: bool = True,
    segmenter=None,  # -> pipeline.inference.Segmenter (tests inject a fake)
) -> ImplantEvaluation:
    """Run ``pairs`` implant pairs of the set ``seed`` through the data path (module docstring).
    ``threshold_pct`` / ``slices_threshold_pct``: the rule's thresholds (default pipeline.compare's
    METAL_WITHHOLD_NEAR_PCT / METAL_WITHHOLD_SLICES_PCT)."""
    from pipeline.bundle import load_bundle
    from pipeline.compare import METAL_WITHHOLD_NEAR_PCT, METAL_WITHHOLD_SLICES_PCT
    from pipeline.inference import Segmenter
    from pipeline.labels import load_label_table
    from pipeline.measure import load_measurement_settings

    if pairs < 1:
        raise ValueError(f"pairs is {pairs!r}; allowed: >= 1")
    threshold = METAL_WITHHOLD_NEAR_PCT if threshold_pct is None else float(threshold_pct)
    slices_threshold = METAL_WITHHOLD_SLICES_PCT if slices_threshold_pct is None else float(slices_threshold_pct)
    if segmenter is None:
        segmenter = Segmenter(load_bundle(Path(bundle_dir), load_label_table(), "auto"),
                              uncertainty="tta" if uncertainty_samples else "off",
                              uncertainty_samples=uncertainty_samples or 2)
    muscles = [label.key for label in segmenter.bundle.labels.labels if not label.is_bone]
    settings = load_measurement_settings()
    rows: list[MuscleRow] = []
    done = []
    t0 = time.monotonic()
    for i in range(pairs):
        pair = pair_params(i, seed, spacing_mm=spacing_mm, variants=variants)
        rows.extend(_run_pair(pair, segmenter, settings, (threshold, slices_threshold), muscles,
                              withhold_partial=withhold_partial))
        done.append((pair.index, pair.kind, pair.implant_side))
        logger.info("implant pair %d (%s %s) done", i, pair.kind, pair.implant_side)
    bundle = segmenter.bundle
    return ImplantEvaluation(
        bundle=f"{bundle.name} {bundle.version}", seed=seed, spacing_mm=spacing_mm, threshold_pct=threshold,
        slices_threshold_pct=slices_threshold,
        pairs=tuple(done), rows=tuple(rows), seconds_per_pair=(time.monotonic() - t0) / pairs,
        withhold_partial=withhold_partial,
    )
