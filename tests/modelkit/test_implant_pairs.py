"""modelkit.implant_pairs: the implant phantom pairs, their truth, the rows and the summaries.

The data path runs with a fake segmenter that returns each phantom's own label map (a perfect
model), so the evaluation's wiring is checked without the bundle: every shown change then equals
the truth, and the muscles around the implant are withheld by pipeline.compare's rule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import modelkit.phantom
from modelkit.implant_pairs import (
    NEAR_MUSCLES,
    ImplantEvaluation,
    MuscleRow,
    evaluate_implants,
    implant_variants,
    choose_thresholds,
    pair_params,
    summarize,
    true_change_pct,
)
from modelkit.phantom_types import PhantomParams
from pipeline.labels import load_label_table
from pipeline.types import Segmentation


def _row(true_pct: float, reported: float | None, unruled: float | None, near: float, slices: float = 0.0,
         key: str = "m") -> MuscleRow:
    return MuscleRow(pair=0, kind="total_hip", implant_side="left", key=key, side="left", atrophied=False,
                     true_pct=true_pct, reported_pct=reported, reason="" if reported is not None else "withheld",
                     unruled_pct=unruled, near_metal_pct=near, metal_slices_pct=slices)


def test_summary_counts_shown_wrong_and_withheld() -> None:
    s = summarize([(-20.0, -19.0), (-60.0, -10.0), (None, -15.0), (3.0, -2.5), (None, 0.0)])
    assert (s.rows, s.shown, s.wrong, s.withheld) == (5, 3, 2, 2)
    assert s.max_abs_error_pp == pytest.approx(50.0)
    assert summarize([]).shown == 0 and summarize([]).max_abs_error_pp == 0.0


def test_chosen_thresholds_withhold_the_wrong_changes_and_as_few_others_as_possible() -> None:
    rows = [_row(-10.0, None, -40.0, 23.46, 0.0), _row(-10.0, None, -17.0, 31.0, 5.0),
            _row(-20.0, -19.0, -19.0, 5.0, 20.0), _row(0.0, -1.0, -1.0, 0.0, 12.0)]
    # near metal alone withholds both wrong ones (23.46 and 31 %) and nothing else
    assert choose_thresholds(rows) == (23.4, None, 2, 0)
    # a wrong change only in the slices of metal: the slices test is needed, at 40 % it spares the others
    streak = _row(0.0, None, -30.0, 0.0, 40.0)
    assert choose_thresholds([*rows, streak]) == (23.4, 40.0, 3, 0)
    assert choose_thresholds(rows[2:]) == (None, None, 0, 0)  # nothing wrong: nothing needs withholding
    # wrong far from metal: no threshold withholds it, it is counted and the others are still chosen for
    assert choose_thresholds([*rows, _row(-10.0, -30.0, -30.0, 0.0, 0.0)]) == (23.4, None, 2, 1)


def test_true_change_is_the_label_ratio() -> None:
    truth = true_change_pct({("a", "left"): 100.0, ("b", "right"): 50.0, ("c", "left"): 0.0},
                            {("a", "left"): 80.0, ("b", "right"): 50.0})
    assert truth == {("a", "left"): pytest.approx(-20.0), ("b", "right"): pytest.approx(0.0)}


def test_pairs_are_one_subject_without_then_with_an_implant_and_known_atrophy() -> None:
    variants = implant_variants()
    if "implant_kind" not in PhantomParams.__dataclass_fields__:
        assert variants == [("total_hip", "left"), ("total_hip", "right")]
    for i in range(4):
        pair = pair_params(i, 11, spacing_mm=3.0)
        prior, follow = pair.prior, pair.follow_up
        assert prior.implant is None and not prior.atrophy and prior.fov_top_mm is None
        assert follow.seed == prior.seed and follow.scan_seed != prior.scan_seed
        assert follow.implant == pair.implant_side == variants[i % len(variants)][1]
        assert prior.spacing_mm == (3.0, 3.0, 3.0)
        sides = ("left", "right") if pair.implant_side == "both" else (pair.implant_side,)
        for side in sides:
            assert sum(k.partition(":")[0] in NEAR_MUSCLES and k.endswith(side) for k in follow.atrophy) == 2
        assert all(0.75 <= v <= 0.95 for v in follow.atrophy.values())
    assert pair_params(0, 11).follow_up.seed != pair_params(0, 12).follow_up.seed


class _TruthSegmenter:
    """A perfect model: the label map of the phantom generated last (sides by the phantom's midline)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.labels = load_label_table()
        self.bundle = SimpleNamespace(labels=self.labels, name="truth", version="0")
        self.last = None
        real = modelkit.phantom.generate_phantom

        def generate(params, labels=None):  # noqa: ANN001, ANN202
            self.last = real(params, labels)
            return self.last

        monkeypatch.setattr(modelkit.phantom, "generate_phantom", generate)

    def segment(self, volume) -> Segmentation:  # noqa: ANN001
        p = self.last
        left = np.broadcast_to(p.side_of_columns()[None, None, :], p.labels.shape)
        sides = np.where(p.labels > 0, np.where(left, 2, 1), 0).astype(np.uint8)
        return Segmentation(p.labels, sides, self.labels, "truth", "0", affine_lps=p.affine_lps)


def test_one_pair_through_the_data_path_with_a_perfect_model(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    seg = _TruthSegmenter(monkeypatch)
    ev = evaluate_implants(Path("unused"), pairs=1, seed=11, spacing_mm=4.0, threshold_pct=10.0,
                           slices_threshold_pct=100.0, segmenter=seg)
    assert ev.pairs == ((0, "total_hip", "left"),) and ev.threshold_pct == 10.0 and ev.slices_threshold_pct == 100.0
    atrophied = {k for k in pair_params(0, 11, spacing_mm=4.0).follow_up.atrophy}
    assert {f"{r.key}:{r.side}" for r in ev.rows if r.atrophied} == atrophied
    with_rule, without = ev.with_rule(), ev.without_rule()
    assert with_rule.rows == without.rows == len(ev.rows) > 40
    assert with_rule.wrong == 0 and with_rule.withheld > without.withheld
    withheld = [r for r in ev.rows if r.reported_pct is None and r.unruled_pct is not None]
    metal = [r for r in withheld if "cannot be trusted" in r.reason]
    assert metal and all(r.near_metal_pct >= 10.0 or r.metal_slices_pct >= 100.0 for r in metal)
    assert all(r.side == "left" for r in metal if r.near_metal_pct >= 10.0)
    assert any(r.near_metal_pct >= 10.0 for r in metal)
    assert any(r.metal_slices_pct > 0 for r in ev.rows) and all(r.metal_slices_pct <= 100.0 for r in ev.rows)
    cut = [r for r in withheld if r not in metal]  # the rest: withheld because the field of view cuts them
    assert cut and all(r.partial and r.reason.startswith("the field of view cuts it") for r in cut)
    assert ev.withhold_partial and all(r.reported_pct is None for r in ev.rows if r.partial)
    for r in ev.rows:
        if r.reported_pct is not None:
            assert abs(r.error_pp) <= 5.0, r  # type: ignore[arg-type]  # a perfect model: alignment only
    table = ev.format_table()
    assert "withheld" in table and "without the rule:" in table
    record = json.loads(ev.write_json(tmp_path / "e.json").read_text())
    assert record["with_rule"]["withheld"] == with_rule.withheld and len(record["rows"]) == len(ev.rows)


def test_evaluation_refuses_no_pairs() -> None:
    with pytest.raises(ValueError, match="pairs"):
        evaluate_implants(Path("unused"), pairs=0, segmenter=SimpleNamespace())


def test_an_evaluation_summary_names_the_threshold_and_both_rules() -> None:
    rows = (_row(-10.0, None, -40.0, 30.0), _row(-20.0, -19.0, -19.0, 5.0))
    ev = ImplantEvaluation("demo 1", 11, 3.0, 10.0, 20.0, ((0, "total_hip", "left"),), rows, 12.0)
    lines = "\n".join(ev.summary_lines())
    assert "withheld from 10 % of voxels near metal or 20 % in slices with metal" in lines
    assert "least withholding with no shown error > 5 pp on these pairs: near 30 %, slices off (1 withheld)" in lines and "2 muscle changes: 1 shown, 0 shown with |error| > 5 pp" in lines
    assert "without the rule: 2 muscle changes: 2 shown, 1 shown with |error| > 5 pp" in lines
    assert dataclasses.asdict(ev.with_rule())["withheld"] == 1


def test_five_pairs_hold_every_implant_kind_and_fifteen_every_combination() -> None:
    from modelkit.implant_pairs import IMPLANT_SIDES, KINDS, implant_variants

    variants = implant_variants()
    assert {k for k, _ in variants[:5]} == set(KINDS)
    assert {s for _, s in variants[:5]} == set(IMPLANT_SIDES)
    assert set(variants) == {(k, s) for k in KINDS for s in IMPLANT_SIDES} and len(variants) == 15


def test_rows_carry_the_largest_tta_uncertainty_of_either_scan() -> None:
    from modelkit.implant_pairs import uncertainty_of
    from pipeline.types import StructureUncertainty

    def study(cv_right: float, ent_right: float, with_left: bool) -> SimpleNamespace:
        def s(side: str, cv: float, ent: float) -> SimpleNamespace:
            return SimpleNamespace(key="psoas", side=side, uncertainty=StructureUncertainty("tta", 2, ent, cv))
        structures = [s("right", cv_right, ent_right), s("both", 99.0, 0.9)]
        if with_left:
            structures.append(s("left", 0.5, 0.01))
        return SimpleNamespace(structures=structures)

    u = uncertainty_of(study(1.0, 0.20, True), study(3.0, 0.05, False))
    assert u == {("psoas", "right"): (3.0, 0.20), ("psoas", "left"): (0.5, 0.01)}  # "both" is not a row
    assert uncertainty_of(SimpleNamespace(structures=[SimpleNamespace(key="psoas", side="left", uncertainty=None)])) == {}
