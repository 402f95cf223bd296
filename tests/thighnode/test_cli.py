"""The command line: phantoms written by `thighnode phantom` are a labelled set the trainer can read."""

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
