"""`thighnode train`: `--init` writes a site's settings file; a settings or data error is one line on stderr
(`thighnode train: ...`, exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from thighnode.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "thighnode_demo"


def _one_line_error(capsys, argv: list[str]) -> str:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("thighnode train: ")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err)
    return lines[0]


def _settings(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'output_bundle = "{tmp_path / "out"}"\ncheckpoint_dir = "{tmp_path / "ck"}"\n' + body)
    return path


def test_a_missing_data_folder_names_the_key_and_the_folder(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    line = _one_line_error(capsys, ["train", str(_settings(tmp_path, f'data_dirs = ["{tmp_path / "nowhere"}"]\n'))])
    assert line == f"thighnode train: data_dirs: folder {tmp_path / 'nowhere'} does not exist"
    assert not (tmp_path / "ck").exists()


def test_a_folder_with_neither_nifti_pairs_nor_dicom_cases(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from tests.modelkit.test_training import _write_cases

    _write_cases(tmp_path / "train", 1)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "readme.txt").write_text("labels to come")
    path = _settings(tmp_path, f'data_dirs = ["{tmp_path / "train"}"]\nval_dirs = ["{tmp_path / "val"}"]\n')
    line = _one_line_error(capsys, ["train", str(path)])
    assert line.startswith(f"thighnode train: val_dirs: {tmp_path / 'val'} holds neither NIfTI pairs")
    assert "nor DICOM case folders" in line


def test_an_unknown_key_is_named_with_the_likely_one(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    line = _one_line_error(capsys, ["train", str(_settings(tmp_path, 'data_dirs = ["d"]\nval_dir = ["v"]\n'))])
    assert line.startswith(f"thighnode train: {tmp_path / 'site.toml'}: unknown training settings ['val_dir'] "
                           "(did you mean val_dir -> val_dirs?)")


def test_bad_toml_names_the_file_and_the_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    line = _one_line_error(capsys, ["train", str(_settings(tmp_path, 'data_dirs = ["d"]\nlr = 1e-3 x\n'))])
    assert line.startswith(f"thighnode train: training config {tmp_path / 'site.toml'} is not valid TOML")
    assert "line 4" in line


def test_an_architecture_other_than_the_init_bundles_is_refused(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = _settings(tmp_path, f'data_dirs = ["d"]\ninit_weights = "{DEMO}"\n[network]\nhidden_size = 768\n')
    line = _one_line_error(capsys, ["train", str(path)])
    assert line == (f"thighnode train: {path}: [network] hidden_size = 768 but the init_weights bundle {DEMO} has 96: "
                    "leave it out to take the bundle's")


def test_a_missing_settings_file_and_an_existing_init_target(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    line = _one_line_error(capsys, ["train", str(tmp_path / "none.toml")])
    assert line == f"thighnode train: training config {tmp_path / 'none.toml'} does not exist"
    assert main(["train", "--init", str(tmp_path / "site.toml"), "--from-bundle", str(DEMO)]) == 0
    assert "wrote" in capsys.readouterr().out
    line = _one_line_error(capsys, ["train", "--init", str(tmp_path / "site.toml")])
    assert "exists already" in line


@pytest.mark.parametrize("argv", [["--init", "site.toml"], []])
def test_the_command_line_itself_prints_one_line(tmp_path: Path, argv: list[str]) -> None:
    """As a site runs it: the written file, still with its placeholder folders, stops at the folder check."""
    run = [sys.executable, "-m", "thighnode", "train"]
    env_path = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if argv:
        done = subprocess.run(run + argv, cwd=tmp_path, env=env_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "site.toml").is_file()
        done = subprocess.run(run + ["site.toml"], cwd=tmp_path, env=env_path, capture_output=True, text=True,
                              timeout=300)
        assert done.stderr.strip().splitlines()[-1] == "thighnode train: data_dirs: folder /path/to/site/train does not exist"
    else:
        done = subprocess.run(run, cwd=tmp_path, env=env_path, capture_output=True, text=True, timeout=300)
        assert done.stderr.strip() == ("thighnode train: a settings file is required (thighnode train SETTINGS.toml), "
                                       "or --init FILE to write one")
    assert done.returncode == 2 and "Traceback" not in done.stderr
