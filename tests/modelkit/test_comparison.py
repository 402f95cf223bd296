"""`thighnode model compare`: a candidate bundle and the deployed one on the same labelled cases
(modelkit.comparison), NIfTI pairs and DICOM case folders (CT + SEG), and the node's corrected cases."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.comparison import compare_bundles, uncertainty_calibration
from modelkit.evaluation import StructureScore
from pipeline.uncertainty import UncertaintyThresholds
from modelkit.evaluation import evaluate_bundle, pooled_cases
from pipeline.labels import load_label_table
from tests.thighnode.test_models import DEMO, make_site_bundle
from thighnode.cli import main

torch.set_num_threads(1)


def _crop_phantom(full: Path, out: Path, slices: slice) -> Path:
    """The phantom's NIfTI pair cut to a slab of slices (axis 0 is patient z): a tiny case that the demo
    model segments in seconds."""
    import nibabel as nib

    out.mkdir(parents=True)
    for kind in ("ct", "label"):
        img = nib.load(str(full / "subject_000" / f"subject_000_{kind}.nii.gz"))
        nib.save(img.slicer[slices], str(out / f"subject_000_{kind}.nii.gz"))
    shutil.copy(full / "dataset.json", out / "dataset.json")
    return out


def _dicom_case(case_dir: Path, nifti_ct: Path) -> Path:
    """A corrected-case folder as the node keeps it (case.json, ct/, seg.dcm) whose SEG is the demo model's
    own segmentation of the CT: on it the deployed (demo) model must score Dice 1."""
    from dicomout.seg import build_seg
    from pipeline.bundle import load_bundle
    from pipeline.inference import Segmenter
    from pipeline.volume import load_volume
    from tests.support.niftict import write_nifti_ct_as_dicom

    paths = write_nifti_ct_as_dicom(nifti_ct, case_dir / "ct", study_uid=case_dir.name, patient_id="TN-CMP-1",
                                    height_m=1.7)
    volume = load_volume(paths)
    seg = Segmenter(load_bundle(DEMO, load_label_table(), "cpu"), device="cpu").segment(volume)
    build_seg(volume, seg, paths, manufacturer="test", software_version="0", device_serial="1").save_as(
        case_dir / "seg.dcm")
    (case_dir / "case.json").write_text("{}")
    return case_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    assert main(["phantom", "--out", str(root / "full"), "--subjects", "1", "--seed", "3", "--spacing", "6"]) == 0
    nifti = _crop_phantom(root / "full", root / "nifti", slice(36, 60))  # 24 slices of 6 mm: mid-thigh
    corrected = root / "node" / "corrected"
    case = _dicom_case(corrected / "1.2.826.0.1.3680043.8.498.77", nifti / "subject_000_ct.nii.gz")
    return {"nifti": nifti, "corrected": corrected, "case": case, "node": root / "node",
            "candidate": make_site_bundle(root / "candidate", delta=0.05)}


@pytest.fixture(scope="module")
def comparison(data: dict[str, Path]):
    cases = pooled_cases([data["nifti"], data["corrected"]])
    return compare_bundles(data["candidate"], DEMO, cases, deployed_source="configured", device="cpu")


def test_both_models_are_scored_on_the_same_nifti_and_dicom_cases(comparison, data: dict[str, Path]) -> None:
    labels = load_label_table()
    assert comparison.cases == ("nifti/subject_000", "corrected/1.2.826.0.1.3680043.8.498.77")
    assert comparison.deployed.sha256 != comparison.candidate.sha256
    assert (comparison.deployed.source, comparison.candidate.version) == ("configured", "0.9.1-site")
    rows = comparison.rows()
    assert len(rows) == 2 * len(labels.labels) and {r.side for r in rows} == {"right", "left"}
    # the DICOM case's SEG is the deployed model's own output: it scores (near) 1 there, by structure
    own = [s for s in comparison.deployed_report.scores
           if s.case.startswith("corrected/") and s.side == "both" and not math.isnan(s.dice)]
    assert len(own) >= 10 and min(s.dice for s in own) > 0.99
    other = [s for s in comparison.candidate_report.scores
             if s.case.startswith("corrected/") and s.side == "both" and not math.isnan(s.dice)]
    assert np.mean([s.dice for s in other]) < np.mean([s.dice for s in own])
    # the deployed model's scores on the NIfTI case are those `thighnode evaluate` gives (the same machinery)
    alone = evaluate_bundle(DEMO, data["nifti"], labels=labels, device="cpu")
    mine = [(s.label_id, s.side, s.dice, s.pred_volume_ml) for s in comparison.deployed_report.scores
            if s.case == "nifti/subject_000"]
    assert mine == [(s.label_id, s.side, s.dice, s.pred_volume_ml) for s in alone.scores]


def test_table_json_and_summary(comparison) -> None:
    table = comparison.format_table()
    assert "candidate: thighnode_demo 0.9.1-site" in table and "deployed:  thighnode_demo 0.9.0" in table
    assert "gluteus_maximus" in table and "MEAN" in table
    # both models drew the node's test-time augmentations: each one's uncertainty is scored against its own errors
    for role in ("deployed", "candidate"):
        assert f"uncertainty calibration, {role}: " in table
    record = json.loads(json.dumps(comparison.to_record(), allow_nan=False))
    means = record["means"]
    assert record["verdict"] == comparison.verdict() != "tie"
    for role, report in (("deployed", comparison.deployed_report), ("candidate", comparison.candidate_report)):
        u = record["uncertainty_calibration"][role]
        rows = [s for s in report.scores if s.side in ("right", "left") and math.isfinite(s.mean_entropy)
                and math.isfinite(s.dice) and math.isfinite(s.ravd)]
        assert rows and u["structure_sides"] == len(rows)
        assert u["flag_sensitivity"] is not None or u["failures"] == 0  # the demo bundle has a threshold
    expected = {"candidate": "candidate is better", "deployed": "deployed model is better",
                "mixed": "mixed: "}[record["verdict"]]
    assert record["summary"].startswith(expected) and table.splitlines()[-1] == record["summary"]
    assert f"mean Dice {means['candidate']['dice']:.3f} vs {means['deployed']['dice']:.3f}" in record["summary"]
    # both models are averaged over the same case set: where the truth has the structure; a structure labelled
    # where the truth has none is counted apart, not averaged in as Dice 0
    for row in record["rows"]:
        if row["cases"] == 0:
            assert row["deployed_dice"] is None and row["candidate_dice"] is None
        else:
            assert row["deployed_dice"] is not None and row["candidate_dice"] is not None
    spurious = sum(1 for s in comparison.candidate_report.scores
                   if s.side in ("right", "left") and s.true_volume_ml == 0 and s.pred_volume_ml > 0)
    assert means["candidate"]["false_positives"] == spurious
    assert f"structures labelled where the truth has none: {spurious} vs" in record["summary"]


def test_a_bundle_against_itself_is_a_tie(data: dict[str, Path], tmp_path: Path) -> None:
    same = shutil.copytree(DEMO, tmp_path / "same")
    result = compare_bundles(same, DEMO, pooled_cases(data["corrected"]), device="cpu", uncertainty_samples=0)
    assert result.verdict() == "tie" and result.summary().startswith("no difference")
    assert all(r.dice_change == 0 or math.isnan(r.dice_change) for r in result.rows())


def _score(dice: float, ravd: float, entropy: float) -> StructureScore:
    return StructureScore("c", 1, "k", "right", dice, ravd, 10.0, 10.0, mean_entropy=entropy, volume_cv_pct=0.0)


def test_uncertainty_calibration_ranks_failures_and_scores_the_flag() -> None:
    assert uncertainty_calibration([_score(0.9, 0.01, math.nan)], None) is None  # no uncertainty measured
    rows = [_score(0.95, 0.01, 0.01), _score(0.93, 0.02, 0.02), _score(0.80, 0.10, 0.20), _score(0.60, 0.30, 0.40)]
    u = uncertainty_calibration(rows, UncertaintyThresholds(0.1, 1e6, "test"))
    assert u is not None and (u["structure_sides"], u["failures"]) == (4, 2)
    assert u["spearman_entropy_vs_dice_loss"] == pytest.approx(1.0) and u["auc_entropy_for_failure"] == 1.0
    assert (u["flag_sensitivity"], u["flag_specificity"]) == (1.0, 1.0)
    # an uncertainty that points the wrong way
    bad = uncertainty_calibration([_score(r.dice, r.ravd, 1.0 - r.mean_entropy) for r in rows],
                                  UncertaintyThresholds(0.85, 1e6, "test"))
    assert bad["spearman_entropy_vs_dice_loss"] == pytest.approx(-1.0) and bad["auc_entropy_for_failure"] == 0.0
    assert (bad["flag_sensitivity"], bad["flag_specificity"]) == (0.0, 0.0)
    assert uncertainty_calibration(rows, None)["flag_sensitivity"] is None


def _config(tmp_path: Path, node_dir: Path) -> str:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{node_dir}"\n[model]\nbundle = "{DEMO}"\ndevice = "cpu"\n')
    return str(path)


def test_cli_compare_on_folders_and_on_the_node_s_corrected_cases(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THIGHNODE_NODE__DATA_DIR", raising=False)
    cfg = _config(tmp_path, data["node"])
    calls = []

    def held_out_cases(node_data_dir: Path, seed: int, fraction: float) -> list[Path]:
        calls.append((node_data_dir, seed, fraction))
        return sorted((Path(node_data_dir) / "corrected").iterdir())

    monkeypatch.setitem(sys.modules, "modelkit.sitecases", types.SimpleNamespace(held_out_cases=held_out_cases))
    assert main(["model", "compare", "--config", cfg, str(data["candidate"]), "--node-data-dir", str(data["node"]),
                 "--seed", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert calls == [(data["node"], 5, 0.2)]
    assert out["cases"] == ["1.2.826.0.1.3680043.8.498.77"]
    assert out["deployed"]["source"] == "configured" and out["candidate"]["version"] == "0.9.1-site"
    assert len(out["rows"]) == 58 and out["verdict"] in ("candidate", "deployed", "mixed")

    assert out["held_out"] == {"node_data_dir": str(data["node"]), "seed": 5, "fraction": 0.2,
                               "from": "the command line", "cases": 1}

    # without --data or --node-data-dir: the configured data directory's corrected cases, split as the
    # candidate was trained (its metadata's training.held_out), else by the defaults
    candidate = shutil.copytree(data["candidate"], tmp_path / "candidate")
    meta_path = candidate / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("training", {})["held_out"] = {"seed": 17, "held_out_fraction": 0.3}
    meta_path.write_text(json.dumps(meta))
    assert main(["model", "compare", "--config", cfg, str(candidate)]) == 0
    assert calls[-1] == (data["node"], 17, 0.3)
    out = capsys.readouterr().out
    assert out.startswith(f"held-out corrected cases of {data['node']}: 1 (seed 17, fraction 0.3, from the "
                          "candidate's training.held_out)")
    assert "candidate: thighnode_demo 0.9.1-site" in out


def test_cli_compare_without_sitecases_or_with_a_broken_candidate_says_so_in_one_line(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THIGHNODE_NODE__DATA_DIR", raising=False)
    cfg = _config(tmp_path, tmp_path / "var")
    monkeypatch.setitem(sys.modules, "modelkit.sitecases", None)  # import fails as if the module were absent
    assert main(["model", "compare", "--config", cfg, str(data["candidate"]), "--node-data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the node's corrected cases (--node-data-dir") and err.count("\n") == 1
    assert "need modelkit.sitecases, which this installation lacks" in err
    assert main(["model", "compare", "--config", cfg, str(tmp_path / "nothing"), "--data", str(data["corrected"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bundle ") and "required file" in err and err.count("\n") == 1
    assert main(["model", "compare", "--config", cfg, str(data["candidate"]), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds neither NIfTI pairs" in err and err.count("\n") == 1
