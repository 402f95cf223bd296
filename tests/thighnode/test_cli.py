"""The command line: phantoms written by `thighnode phantom` are a labelled set the trainer can read; the
model-work commands pass their options on (they replaced the `python -m` entry points of the moved modules)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pydicom
import pytest

from modelkit.nifti import list_nifti_cases, load_nifti_pair
from thighnode.cli import build_parser, main


def test_phantom_command_writes_nifti_dicom_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--subjects", "1", "--seed", "3", "--spacing", "4", "--dicom"]) == 0
    cases = list_nifti_cases(out)
    assert len(cases) == 1
    hu, labels, affine = load_nifti_pair(cases[0].ct_path, cases[0].label_path)[:3]
    assert hu.shape == labels.shape and int(labels.max()) == 29
    truth = json.loads(next(out.glob("*/*_truth.json")).read_text())
    assert "gluteus_maximus" in json.dumps(truth)
    dicoms = sorted(out.glob("*/dicom/*.dcm"))
    assert len(dicoms) == hu.shape[0]
    assert pydicom.dcmread(dicoms[0], stop_before_pixels=True).Modality == "CT"


def test_invalid_config_is_reported_with_key_and_value(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nport = 0\n")
    assert main(["status", "--config", str(cfg)]) == 2
    assert "node.port = 0: allowed 1..65535" in capsys.readouterr().err


def test_a_missing_labelled_set_is_a_clear_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "thighnode_demo"
    missing = tmp_path / "no_such_set"
    for argv in (["calibrate", "--bundle", str(bundle), "--data", str(missing), "--dry-run"],
                 ["evaluate", "--bundle", str(bundle), "--data", str(missing)]):
        assert main(argv) == 2
        assert f"error: data folder {missing} does not exist" in capsys.readouterr().err


def test_calibrate_fits_the_median_case_when_asked(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`thighnode calibrate --objective median --dry-run`: prints the fit with per-case errors and
    leaves the bundle as it was."""
    from tests.modelkit.test_training import _write_cases

    bundle = Path(__file__).resolve().parents[2] / "bundles" / "thighnode_demo"
    before = (bundle / "configs" / "metadata.json").read_bytes()
    _write_cases(tmp_path / "set", 2)
    assert main(["calibrate", "--bundle", str(bundle), "--data", str(tmp_path / "set"), "--objective", "median",
                 "--iterations", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 2 cases" in out and "objective median" in out and "per case before" in out
    assert (bundle / "configs" / "metadata.json").read_bytes() == before
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--bundle", str(bundle), "--data", str(tmp_path / "set"), "--objective", "mean"])
    assert exc.value.code == 2
    assert "invalid choice: 'mean' (choose from 'pooled', 'median')" in capsys.readouterr().err


def test_calibrate_offers_exactly_the_objectives_of_the_calibration() -> None:
    """The CLI spells the objectives itself (importing modelkit.calibration would load torch for every
    command): they must stay those of modelkit.calibration, default included."""
    from modelkit.calibration import DEFAULT_OBJECTIVE, OBJECTIVES

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    objective = next(a for a in subparsers.choices["calibrate"]._actions if "--objective" in a.option_strings)
    assert tuple(objective.choices) == OBJECTIVES and objective.default == DEFAULT_OBJECTIVE


def test_sidecheck_command_passes_its_options_and_exits_1_when_the_check_fails(monkeypatch, capsys) -> None:  # noqa: ANN001
    """`thighnode sidecheck` (once `python -m pipeline.sidecheck`): the options reach the check, its table is
    printed, and a failed check is exit status 1."""
    import modelkit.sidecheck

    seen = {}

    class Result:
        passed = False

        def format_table(self) -> str:
            return "loss on the atrophied side only: FAILED"

    def fake(bundle: Path, **kwargs: float) -> Result:
        seen.update(bundle=bundle, **kwargs)
        return Result()

    monkeypatch.setattr(modelkit.sidecheck, "run_sidecheck", fake)
    argv = ["sidecheck", "--bundle", "b", "--spacing", "3", "--tolerance", "0.1", "--side-tolerance", "0.04"]
    assert main(argv) == 1
    assert seen == {"bundle": Path("b"), "spacing_mm": 3.0, "tolerance": 0.1, "side_tolerance": 0.04}
    assert "FAILED" in capsys.readouterr().out
    Result.passed = True
    assert main(["sidecheck"]) == 0
    assert seen["bundle"] == Path("bundles/thighnode_demo") and seen["spacing_mm"] == 2.0


def test_realcheck_command_prints_the_scores_of_the_real_ct(monkeypatch, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    """`thighnode realcheck` (once `python -m pipeline.realcheck`): segments the given CT with the given bundle
    and prints Dice and volumes per structure-side with their mean."""
    import modelkit.realcheck
    from modelkit.realcheck import RealScore

    seen = []

    def fake(bundle: Path, data: Path) -> tuple[None, list[RealScore]]:
        seen.append((bundle, data))
        return None, [RealScore("femur", "left", 0.5, 120.0, 121.0), RealScore("femur", "right", 0.7, 1.0, 2.0)]

    monkeypatch.setattr(modelkit.realcheck, "run", fake)
    assert main(["realcheck", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "d")]) == 0
    assert seen == [(tmp_path / "b", tmp_path / "d")]
    out = capsys.readouterr().out
    assert ["femur", "left", "0.500", "120.0", "121.0"] in [line.split() for line in out.splitlines()]
    assert "mean Dice over 2 reference structure-sides (femur, gluteus maximus / medius / minimus): 0.600" in out
    assert main(["realcheck"]) == 0
    assert seen[-1] == (modelkit.realcheck.REPO_BUNDLE, modelkit.realcheck.DEFAULT_DATA_DIR)


def test_train_export_writes_the_bundle_of_a_checkpoint_without_training(monkeypatch, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    """`thighnode train CONFIG --export CKPT` (once `python -m pipeline.training --export`): the settings carry
    the overrides and the command line; nothing is trained."""
    import modelkit.training

    seen = {}

    def fake_export(settings, checkpoint: Path, output: Path) -> Path:  # noqa: ANN001
        seen.update(settings=settings, checkpoint=checkpoint, output=output)
        return output

    def no_training(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("--export must not train")

    monkeypatch.setattr(modelkit.training, "export_checkpoint", fake_export)
    monkeypatch.setattr(modelkit.training, "train", no_training)
    config = Path(__file__).resolve().parents[2] / "config" / "train_demo.toml"
    argv = ["train", str(config), "--export", str(tmp_path / "ckpt.pt"), "--output", str(tmp_path / "out"),
            "--checkpoint-dir", str(tmp_path / "ck"), "--iterations", "7"]
    assert main(argv) == 0
    settings = seen["settings"]
    assert seen["checkpoint"] == tmp_path / "ckpt.pt" and seen["output"] == tmp_path / "out"
    assert settings.checkpoint_dir == tmp_path / "ck" and settings.iterations == 7
    assert settings.command.startswith(f"thighnode train {config} --iterations 7 --output")
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")


def test_evaluate_and_calibrate_take_the_device(monkeypatch, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    """`--device` (once only on `python -m pipeline.evaluation` / `pipeline.calibration`) reaches the model."""
    import modelkit.calibration
    import modelkit.evaluation

    seen = {}

    class Report:
        def format_table(self) -> str:
            return "table"

    def fake_evaluate(bundle: Path, data: object, **kwargs: object) -> Report:
        seen["evaluate"] = kwargs["device"]
        return Report()

    def fake_calibrate(bundle: Path, data: object, **kwargs: object) -> str:
        seen["calibrate"] = kwargs["device"]
        return "result"

    monkeypatch.setattr(modelkit.evaluation, "evaluate_bundle", fake_evaluate)
    monkeypatch.setattr(modelkit.calibration, "calibrate_bundle", fake_calibrate)
    monkeypatch.setattr(modelkit.calibration, "format_result", lambda result: f"fit {result}")
    assert main(["evaluate", "--bundle", "b", "--data", str(tmp_path), "--device", "cpu"]) == 0
    assert main(["calibrate", "--bundle", "b", "--data", str(tmp_path), "--device", "cpu", "--dry-run"]) == 0
    assert seen == {"evaluate": "cpu", "calibrate": "cpu"}
    assert capsys.readouterr().out.split() == ["table", "fit", "result"]


def test_evaluate_generates_only_the_missing_phantom_sets_a_training_config_defines(
    monkeypatch, tmp_path: Path  # noqa: ANN001
) -> None:
    """`evaluate --generate-from CONFIG` writes the --data folders that CONFIG defines as [[phantoms]] and that
    are missing (what `make evaluate-demo` needs), and nothing else."""
    import modelkit.evaluation
    import modelkit.training

    written: list[Path] = []
    monkeypatch.setattr(modelkit.training, "write_phantom_set", lambda out, spec: written.append(Path(out)))
    monkeypatch.setattr(modelkit.evaluation, "evaluate_bundle", lambda bundle, data, **kw: type(
        "R", (), {"format_table": lambda self: "table"})())
    missing, present, other = tmp_path / "test", tmp_path / "test5", tmp_path / "train"
    present.mkdir()
    (present / "case_ct.nii.gz").write_bytes(b"")
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'data_dirs = ["{other}"]\noutput_bundle = "{tmp_path / "bundle"}"\ncheckpoint_dir = "{tmp_path / "ckpt"}"\n'
        + "".join(f'[[phantoms]]\ndir = "{d}"\nn_subjects = 2\nseed = 3\n' for d in (missing, present, other)),
        encoding="utf-8",
    )
    rc = main(["evaluate", "--bundle", "b", "--data", str(missing), str(present), "--generate-from", str(cfg)])
    assert rc == 0
    assert written == [missing]


def test_evaluate_real_prints_the_real_ct_beside_the_phantoms(monkeypatch, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    """`evaluate --real [DIR]` segments the real CT with the evaluated bundle (default folder: shared data)."""
    import modelkit.evaluation
    import modelkit.realcheck

    seen = {}

    def fake_run(bundle: Path, data: Path) -> tuple[None, list[str]]:
        seen.setdefault("runs", []).append((bundle, data))
        return None, ["scores"]

    monkeypatch.setattr(modelkit.realcheck, "run", fake_run)
    monkeypatch.setattr(modelkit.realcheck, "format_beside", lambda report, scores: f"beside {report} {scores[0]}")
    report = type("R", (), {"format_table": lambda self: "table", "__str__": lambda self: "phantoms"})()
    monkeypatch.setattr(modelkit.evaluation, "evaluate_bundle", lambda bundle, data, **kw: report)
    assert main(["evaluate", "--bundle", "bdir", "--data", str(tmp_path), "--real"]) == 0
    assert main(["evaluate", "--bundle", "bdir", "--data", str(tmp_path), "--real", str(tmp_path / "ct")]) == 0
    assert seen["runs"] == [(Path("bdir"), modelkit.realcheck.DEFAULT_DATA_DIR), (Path("bdir"), tmp_path / "ct")]
    assert capsys.readouterr().out.split().count("beside") == 2


def test_status_shows_each_outbox_item_with_its_transport(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`thighnode status` (text and --json) names the transport an item is sent by."""
    import json

    from dicomout.outbox import Outbox

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    outbox = Outbox(tmp_path / "var" / "thighnode.db")
    outbox.enqueue(tmp_path / "a.dcm", "pacs", job_id=1, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                   sop_instance_uid="1.2.3.4")
    outbox.enqueue(tmp_path / "b.pdf", "ris", job_id=1, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.104.1", sop_instance_uid="1.2.3.5",
                   transport="webhook")
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "-> pacs (cstore)  1.2.3.4" in text and "-> ris (webhook)  1.2.3.5" in text
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    items = json.loads(capsys.readouterr().out)["outbox"]
    assert {(i["destination"], i["transport"]) for i in items} == {("pacs", "cstore"), ("ris", "webhook")}


def test_status_shows_the_transfer_syntax_each_object_was_sent_in(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Issue 24: `thighnode status` says whether the SEG went deflated or uncompressed to a destination."""
    import json

    from dicomout.outbox import Outbox

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    outbox = Outbox(tmp_path / "var" / "thighnode.db")
    seg = "1.2.840.10008.5.1.4.1.1.66.4"
    for dest, ts in (("pacs", "1.2.840.10008.1.2.1.99"), ("oldpacs", "1.2.840.10008.1.2.1")):
        item_id = outbox.enqueue(tmp_path / "seg.dcm", dest, job_id=1, study_uid="1.2.3", sop_class_uid=seg,
                                 sop_instance_uid="1.2.3.4")
        item = outbox.get(item_id)
        assert item is not None
        outbox.mark_sent(item, 0, transfer_syntax_uid=ts)
    outbox.enqueue(tmp_path / "sr.dcm", "pacs", job_id=1, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                   sop_instance_uid="1.2.3.5")
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "sent as Deflated Explicit VR Little Endian (Segmentation Storage)" in text
    assert "sent as Explicit VR Little Endian (Segmentation Storage)" in text
    assert text.count("sent as") == 2  # the pending SR has not been sent in any syntax yet
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    items = json.loads(capsys.readouterr().out)["outbox"]
    assert {(i["destination"], i["sop_instance_uid"], i["transfer_syntax_uid"]) for i in items} == {
        ("pacs", "1.2.3.4", "1.2.840.10008.1.2.1.99"), ("oldpacs", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("pacs", "1.2.3.5", ""),
    }
    assert {i["transfer_syntax"] for i in items} == {"Deflated Explicit VR Little Endian", "Explicit VR Little Endian", ""}


def test_status_prints_each_jobs_coverage(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`thighnode status`: one coverage line per job (regions seen, segmentation, policy); --json carries it."""
    import json

    from thighnode.jobs import DECLINED, JobStore, StudyProgress

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    jobs = JobStore(tmp_path / "var" / "thighnode.db")
    jobs.sync([StudyProgress("1.2.3", 0.0)], now=100.0, quiet_period_s=1)
    job = jobs.claim_next()
    coverage = {
        "policy": {"accept_regions": ["hip", "thigh"], "min_region_mm": 20.0},
        "regions": {"pelvis": [187.3, 220.3], "hip": [94.3, 181.3]},
        "from_segmentation": ["hip", "thigh (cut)"],
    }
    jobs.finish(job.id, DECLINED, "why", result={"coverage": coverage})
    jobs.close()
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert (
        "coverage: pelvis 187..220 mm, hip 94..181 mm; segmentation: hip, thigh (cut); policy: hip or thigh over >= 20 mm"
        in text
    )
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["jobs"]
    assert row["coverage"] == coverage


def test_evaluate_implants_passes_its_options_writes_json_and_exits_0(monkeypatch, capsys, tmp_path: Path) -> None:  # noqa: ANN001
    """`thighnode evaluate-implants`: options reach the evaluation, the threshold defaults to the node
    configuration's prior.metal_withhold_near_pct, the table is printed and the JSON written; an evaluation
    with wrong values still exits 0."""
    import modelkit.implant_pairs
    from modelkit.implant_pairs import ImplantEvaluation, MuscleRow

    seen: dict = {}
    wrong = MuscleRow(0, "total_hip", "left", "gluteus_medius", "left", True, -10.0, -60.0, "", -60.0, 2.0)

    def fake(bundle: Path, **kwargs) -> ImplantEvaluation:  # noqa: ANN003
        seen.update(bundle=bundle, **kwargs)
        return ImplantEvaluation("fake 1", kwargs["seed"], kwargs["spacing_mm"], kwargs["threshold_pct"],
                                 kwargs["slices_threshold_pct"], ((0, "total_hip", "left"),), (wrong,), 1.0)

    monkeypatch.setattr(modelkit.implant_pairs, "evaluate_implants", fake)
    out = tmp_path / "implants.json"
    argv = ["evaluate-implants", "--bundle", "b", "--pairs", "3", "--seed", "11", "--spacing", "4", "--json", str(out)]
    assert main(argv) == 0
    assert seen == {"bundle": Path("b"), "pairs": 3, "seed": 11, "spacing_mm": 4.0, "threshold_pct": 7.0,
                    "slices_threshold_pct": 1.0, "uncertainty_samples": 2, "withhold_partial": True}
    printed = capsys.readouterr().out
    assert "1 shown with |error| > 5 pp" in printed and str(out) in printed
    assert json.loads(out.read_text())["with_rule"]["wrong"] == 1
    config = tmp_path / "node.toml"
    config.write_text("[prior]\nmetal_withhold_near_pct = 25.0\nmetal_withhold_slices_pct = 35.0\n")
    assert main(["evaluate-implants", "--config", str(config)]) == 0
    assert seen["threshold_pct"] == 25.0 and seen["slices_threshold_pct"] == 35.0 and seen["bundle"] == Path("bundles/thighnode_demo") and seen["seed"] == 18
    assert main(["evaluate-implants", "--threshold", "7.5", "--slices-threshold", "60"]) == 0
    assert seen["threshold_pct"] == 7.5 and seen["slices_threshold_pct"] == 60.0
    assert main(["evaluate-implants", "--uncertainty-samples", "0"]) == 0 and seen["uncertainty_samples"] == 0
    assert main(["evaluate-implants", "--keep-partial"]) == 0 and seen["withhold_partial"] is False
    config.write_text("[prior]\nwithhold_partial = false\n")
    assert main(["evaluate-implants", "--config", str(config)]) == 0 and seen["withhold_partial"] is False


def test_resend_queues_failed_items_again_once_and_checks_its_arguments(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from dicomout.outbox import Outbox

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                   'host = "127.0.0.1"\nport = 4242\n', encoding="utf-8")
    outbox = Outbox(tmp_path / "var" / "thighnode.db")
    ids = [outbox.enqueue(tmp_path / f"{i}.dcm", "pacs", job_id=3, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                          sop_instance_uid=f"1.2.3.{i}") for i in range(2)]
    for item in outbox.due():
        outbox.mark_retry(item, "association rejected (gave up)", None, permanent=True)
    assert main(["resend", "--destination", "pacs", "--failed", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"item {ids[0]} -> pacs: SOP Instance UID 1.2.3.0 (job 3)" in out and "2 item(s) queued again" in out
    assert [i.state for i in outbox.items()] == ["pending", "pending"]
    assert main(["resend", "--job", "3", "--config", str(cfg)]) == 0  # already pending: nothing
    assert "nothing to send again" in capsys.readouterr().out
    assert main(["resend", "--destination", "nowhere", "--failed", "--config", str(cfg)]) == 2
    assert "destination 'nowhere' is not configured; configured: pacs" in capsys.readouterr().err
    assert main(["resend", "--item", "99", "--config", str(cfg)]) == 2
    assert "there is no outbox item 99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["resend", "--item", "1", "--job", "3", "--config", str(cfg)])


def test_status_shows_refusals_at_receipt_and_conflicts(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from scp.index import InstanceConflict, InstanceIndex
    from scp.refusals import Refusal, RefusalLog

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    db = tmp_path / "var" / "thighnode.db"
    log = RefusalLog(db)
    log.record(Refusal(1.7e9, "c-store", "CT1", "10.0.0.5", 0xC003, "Pixel Data (7FE0,0010) is 256 bytes; ...", "1.2.9"))
    log.record(Refusal(1.7e9 + 1, "association", "INTRUDER", "10.0.0.9", None, "association rejected: calling AE "
                       "not recognised"))
    log.close()
    index = InstanceIndex(db)
    index.record_conflict(InstanceConflict(1.7e9, "1.2.8", "1.2", "CT2", "10.0.0.6", "a" * 64, "b" * 64, "first copy kept"))
    index.close()
    assert main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "refused at receipt: {'0xC003': 1, 'association': 1}" in text
    assert "C-STORE 0xC003 1.2.9  from CT1 at 10.0.0.5" in text and "Pixel Data (7FE0,0010) is 256 bytes" in text
    assert "association  from INTRUDER at 10.0.0.9" in text
    assert "1.2.8  study 1.2  from CT2 at 10.0.0.6" in text
    assert main(["status", "--json", "--refusals", "1", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["calling_ae"] for r in report["refusals"]["recent"]] == ["INTRUDER"]
    assert report["conflicts"][0]["sop_instance_uid"] == "1.2.8"
