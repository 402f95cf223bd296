"""Metrics on known masks, and the report's table/CSV."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from modelkit.evaluation import EvaluationReport, dice_per_structure, ravd_per_structure, score_case
from pipeline.labels import load_label_table


def test_dice_identical_is_one() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[1:3, 1:3, 1:3] = 2
    assert dice_per_structure(a, a, [2])[2] == 1.0
    assert math.isnan(dice_per_structure(a, a, [5])[5])


def test_dice_and_ravd_known_values() -> None:
    truth = np.zeros((1, 1, 10), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, 0:4] = 1  # 4 voxels
    pred[0, 0, 2:8] = 1  # 6 voxels, 2 overlap
    assert dice_per_structure(pred, truth, [1])[1] == pytest.approx(2 * 2 / (4 + 6))
    assert ravd_per_structure(pred, truth, [1])[1] == pytest.approx(abs(6 - 4) / 4)


def test_report_table_and_csv(tmp_path: Path) -> None:
    labels = load_label_table()
    truth = np.zeros((2, 2, 10), np.uint8)
    truth[:, :, :5] = 1
    scores = score_case("c1", truth, truth, labels, 0.008)
    report = EvaluationReport("b", "1", ("c1",), tuple(scores), 1.0)
    assert report.mean_dice() == 1.0
    assert "sartorius" in report.format_table()
    text = report.write_csv(tmp_path / "r.csv").read_text()
    assert text.splitlines()[0].startswith("case,label_id,key,side,dice,ravd")
    assert "c1,1,sartorius,both,1.000000,0.000000" in text


def _two_structure_report(pred_extra: int) -> EvaluationReport:
    """Sartorius (muscle) and femur (bone), 100 voxels each; the prediction adds ``pred_extra``
    voxels to the sartorius and as many to the femur."""
    labels = load_label_table()
    femur = labels.by_key("femur").id
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[0] = 1
    truth[1] = femur
    pred = truth.copy()
    pred[2].flat[:pred_extra] = 1
    pred[3].flat[:pred_extra] = femur
    return EvaluationReport("b", "1", ("c1",), tuple(score_case("c1", pred, truth, labels, 0.008)), 1.0)


def test_targets_met_when_every_present_muscle_is_within_five_percent() -> None:
    report = _two_structure_report(4)  # 4 % over: Dice 0.98, volume error 4 %
    assert report.target_shortfalls() == []
    assert "targets (mean Dice >= 0.90; volume error <= 5 % for every muscle): MET" in report.format_table()


def test_targets_name_the_muscles_and_the_mean_that_miss() -> None:
    report = _two_structure_report(30)  # 30 % over: Dice 0.87, volume error 30 %
    short = report.target_shortfalls()
    assert short[0].startswith("mean Dice 0.87")
    assert "sartorius: volume error 30.0 % > 5 %" in short
    assert not any(s.startswith("femur") for s in short)  # bones are held to the Dice target only
    assert "NOT MET (2)" in report.format_table()


def test_a_bundle_is_evaluated_over_several_folders_pooled(tmp_path: Path) -> None:
    """Held-out sets come in several folders (the demo has two); one report pools their cases, and
    each case scores as it does alone."""
    import torch

    from modelkit.evaluation import evaluate_bundle
    from pipeline.bundle import write_bundle
    from pipeline.labels import load_label_table
    from pipeline.network import NetworkSettings, build_network
    from pipeline.preprocess import PreprocessSettings
    from thighnode.cli import main

    labels = load_label_table()
    tiny = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)
    torch.manual_seed(0)
    bundle = write_bundle(tmp_path / "b", build_network(tiny, labels.num_classes), tiny,
                          PreprocessSettings(spacing_mm=(8.0, 8.0, 8.0)), labels, {"name": "tiny", "version": "0.0.1"})
    for name, seed in (("a", "3"), ("c", "4")):
        assert main(["phantom", "--out", str(tmp_path / name), "--subjects", "1", "--seed", seed, "--spacing", "6"]) == 0
    alone = evaluate_bundle(bundle, tmp_path / "c", labels=labels, device="cpu")
    pooled = evaluate_bundle(bundle, [tmp_path / "a", tmp_path / "c"], labels=labels, device="cpu")
    assert alone.cases == ("subject_000",)
    assert pooled.cases == ("a/subject_000", "c/subject_000")  # same case names in both folders: told apart
    mine = [s for s in pooled.scores if s.case == "c/subject_000"]
    assert [(s.label_id, s.side, s.pred_volume_ml) for s in mine] == [
        (s.label_id, s.side, s.pred_volume_ml) for s in alone.scores]
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(tmp_path / "a"), str(tmp_path / "c"),
                 "--csv", str(tmp_path / "e.csv")]) == 0
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == set(pooled.cases)


def test_evaluate_passes_overlap_and_precision_instead_of_the_bundles(tmp_path: Path, monkeypatch) -> None:
    """`thighnode evaluate --overlap 0.25 --precision bf16`: the accuracy check of inference settings."""
    import modelkit.evaluation as evaluation
    from thighnode.cli import main

    seen: list[dict] = []
    report = EvaluationReport("b", "1", (), (), 0.0)
    monkeypatch.setattr(evaluation, "evaluate_bundle", lambda *a, **k: seen.append(k) or report)
    assert main(["evaluate", "--bundle", "b", "--data", str(tmp_path), "--overlap", "0.25", "--precision", "bf16"]) == 0
    assert main(["evaluate", "--bundle", "b", "--data", str(tmp_path)]) == 0
    assert [(k["overlap"], k["precision"]) for k in seen] == [(0.25, "bf16"), (None, None)]
    with pytest.raises(SystemExit):
        main(["evaluate", "--bundle", "b", "--data", str(tmp_path), "--precision", "fp16"])


def test_the_csv_holds_every_case_evaluated_before_a_stop(tmp_path: Path, monkeypatch) -> None:
    """A long evaluation stopped (or failing) part way keeps the cases it scored, with the settings asked for."""
    import torch

    import pipeline.inference as inference
    from modelkit.evaluation import evaluate_bundle
    from pipeline.bundle import write_bundle
    from pipeline.network import NetworkSettings, build_network
    from pipeline.preprocess import PreprocessSettings
    from thighnode.cli import main

    labels = load_label_table()
    tiny = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)
    torch.manual_seed(0)
    bundle = write_bundle(tmp_path / "b", build_network(tiny, labels.num_classes), tiny,
                          PreprocessSettings(spacing_mm=(8.0, 8.0, 8.0)), labels, {"name": "tiny", "version": "0.0.1"})
    assert main(["phantom", "--out", str(tmp_path / "a"), "--subjects", "2", "--seed", "3", "--spacing", "6"]) == 0
    made: list[tuple[float, str]] = []

    class StopsAtTheSecondCase(inference.Segmenter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append((self._overlap, self._precision))
            self.calls = 0

        def segment(self, volume):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().segment(volume)

    monkeypatch.setattr(inference, "Segmenter", StopsAtTheSecondCase)
    with pytest.raises(KeyboardInterrupt):
        evaluate_bundle(bundle, tmp_path / "a", csv_path=tmp_path / "e.csv", labels=labels, device="cpu",
                        overlap=0.25, precision="bf16")
    assert made == [(0.25, "bf16")]
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == {"subject_000"} and len(rows) > 30
