"""A site's path to a fine-tuned model: data folders of either kind, the settings file `thighnode train --init`
writes, the architecture taken from (and checked against) the init bundle, the node's corrected cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelkit.casefolders import DICOM, NIFTI, DataFolderError, folder_kind, list_labelled_cases, load_labelled_case
from modelkit.sitesettings import PLACEHOLDER_TRAIN, PLACEHOLDER_VAL, write_site_settings
from modelkit.train_settings import TrainSettings
from pipeline.bundle import METADATA_PATH
from pipeline.labels import load_label_table
from pipeline.network import NetworkSettings
from pipeline.preprocess import PreprocessSettings
from tests.modelkit.test_training import _write_cases
from tests.support.dicom_cases import thigh_arrays, write_corrected_case, write_dicom_case

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "thighnode_demo"


def _demo_meta() -> dict:
    return json.loads((DEMO / METADATA_PATH).read_text())


def test_a_folder_is_read_as_nifti_pairs_or_dicom_cases_and_anything_else_is_named(tmp_path: Path) -> None:
    labels = load_label_table()
    _write_cases(tmp_path / "nifti", 1)
    write_dicom_case(tmp_path / "dicom" / "case_a", study_uid="1.2.826.0.1.3680043.10.9.1", patient_id="A")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    assert folder_kind(tmp_path / "nifti") == NIFTI and folder_kind(tmp_path / "dicom") == DICOM
    [case] = list_labelled_cases(tmp_path / "dicom", "val_dirs")
    assert case.kind == DICOM and case.name == "case_a"
    hu, lab, _ = load_labelled_case(case, labels)
    assert np.array_equal(lab, thigh_arrays(0)[1])
    with pytest.raises(DataFolderError, match=r"^val_dirs: .*empty holds neither NIfTI pairs .* nor DICOM case"):
        folder_kind(tmp_path / "empty", "val_dirs")
    with pytest.raises(DataFolderError, match=r"^calibration_dirs: folder .*nowhere does not exist"):
        list_labelled_cases(tmp_path / "nowhere", "calibration_dirs")


def test_dicom_dirs_is_still_read_as_data_folders(tmp_path: Path) -> None:
    s = TrainSettings.from_dict({"data_dirs": ["a"], "dicom_dirs": ["b", "a"], "output_bundle": "o",
                                 "checkpoint_dir": "c"})
    assert s.data_dirs == (Path("a"), Path("b")) and s.dicom_dirs == ()
    only = TrainSettings.from_dict({"dicom_dirs": "b", "output_bundle": "o", "checkpoint_dir": "c"})
    assert only.data_dirs == (Path("b"),)


def test_a_minimal_file_takes_the_architecture_from_the_init_bundle(tmp_path: Path) -> None:
    meta = _demo_meta()
    s = TrainSettings.from_dict({"data_dirs": ["d"], "output_bundle": "o", "checkpoint_dir": "c",
                                 "init_weights": str(DEMO)})
    assert s.network.to_dict() == NetworkSettings.from_dict(meta["network_settings"]).to_dict()
    assert s.preprocess.to_dict() == PreprocessSettings.from_dict(meta["preprocess_settings"]).to_dict()
    assert s.network != NetworkSettings()  # not the production default the file would otherwise get
    same = TrainSettings.from_dict({"data_dirs": ["d"], "output_bundle": "o", "checkpoint_dir": "c",
                                    "init_weights": str(DEMO), "network": {"num_heads": meta["network_settings"]["num_heads"]}})
    assert same.network == s.network


@pytest.mark.parametrize("section, key, value, shown", [
    ("network", "hidden_size", 768, "768"),
    ("network", "img_size", [96, 96, 96], "[96, 96, 96]"),
    ("preprocess", "spacing_mm", [1.5, 1.5, 1.5], "[1.5, 1.5, 1.5]"),
])
def test_an_architecture_that_differs_from_the_init_bundle_is_one_line_naming_both_values(
        section: str, key: str, value, shown: str) -> None:  # noqa: ANN001
    theirs = json.dumps(_demo_meta()[f"{section}_settings"][key])
    data = {"data_dirs": ["d"], "output_bundle": "o", "checkpoint_dir": "c", "init_weights": str(DEMO),
            section: {key: value}}
    with pytest.raises(ValueError) as caught:
        TrainSettings.from_dict(data, source="site.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"site.toml: [{section}] {key} = {shown} but the init_weights bundle")
    assert message.split(" has ")[1].startswith(theirs)
    if section == "preprocess":  # a deliberate change of the model grid is allowed when asked for
        s = TrainSettings.from_dict({**data, "allow_preprocess_change": True})
        assert list(s.preprocess.spacing_mm) == value


def test_init_writes_a_file_that_loads_once_the_paths_are_filled_and_fits_its_bundle(tmp_path: Path) -> None:
    from modelkit.training import load_init_weights
    from pipeline.network import build_network

    path = write_site_settings(tmp_path / "site.toml", DEMO)
    text = path.read_text()
    assert "[[phantoms]]" not in text and PLACEHOLDER_TRAIN in text
    with pytest.raises(ValueError, match="exists already"):
        write_site_settings(path, DEMO)
    _write_cases(tmp_path / "train", 1)
    (tmp_path / "val").mkdir()
    path.write_text(text.replace(PLACEHOLDER_TRAIN, str(tmp_path / "train")).replace(PLACEHOLDER_VAL, str(tmp_path / "val")))
    s = TrainSettings.from_toml(path)
    meta = _demo_meta()
    assert s.init_weights is not None and s.init_weights.resolve() == DEMO.resolve()
    assert s.network.to_dict() == NetworkSettings.from_dict(meta["network_settings"]).to_dict()
    assert s.preprocess.to_dict() == PreprocessSettings.from_dict(meta["preprocess_settings"]).to_dict()
    assert s.data_dirs == (tmp_path / "train",) and s.val_dirs == (tmp_path / "val",) and s.phantoms == {}
    assert s.iterations <= 1000 and s.lr < 1e-3  # a fine-tune, not a training from scratch
    assert s.bundle_name != meta["name"] and s.output_bundle != DEMO
    # the weights of the bundle fit the network the file describes
    assert len(load_init_weights(build_network(s.network, load_label_table().num_classes), s.init_weights)) == 64


def test_init_from_another_bundle_takes_its_architecture(tmp_path: Path) -> None:
    import torch

    from pipeline.bundle import write_bundle
    from pipeline.network import build_network

    labels = load_label_table()
    net = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)
    pre = PreprocessSettings(spacing_mm=(4.0, 4.0, 4.0))
    torch.manual_seed(0)
    bundle = write_bundle(tmp_path / "tiny", build_network(net, labels.num_classes), net, pre, labels,
                          {"name": "tiny", "version": "0.0.1"})
    path = write_site_settings(tmp_path / "site.toml", bundle)
    s = TrainSettings.from_toml(path)
    assert s.network == net and s.preprocess == pre and s.init_weights == bundle.resolve()


def test_a_fine_tune_from_the_demo_bundle_on_the_nodes_corrected_cases(tmp_path: Path) -> None:
    """Three corrected studies of two patients: one patient is held out (never trained on) and named in the
    bundle; validation runs on a DICOM folder; the bundle starts from the demo's weights.
    (2 steps on 24x28x40-voxel cases.)"""
    import hashlib

    from modelkit.sitecases import held_out_cases
    from modelkit.training import train

    node = tmp_path / "node"
    a1 = write_corrected_case(node, patient_id="A", seed=1)
    a2 = write_corrected_case(node, patient_id="A", seed=2)
    b1 = write_corrected_case(node, patient_id="B", seed=3)
    write_dicom_case(tmp_path / "val" / "v1", study_uid="1.2.826.0.1.3680043.10.9.2", patient_id="V", seed=4)
    settings = TrainSettings.from_dict({
        "node_data_dir": str(node), "val_dirs": [str(tmp_path / "val")], "init_weights": str(DEMO),
        "output_bundle": str(tmp_path / "bundle"), "checkpoint_dir": str(tmp_path / "ckpt"),
        "iterations": 2, "val_every": 2, "warmup_iterations": 1, "samples_per_volume": 1, "num_threads": 1,
        "lr": 1e-4, "seed": 3, "held_out_fraction": 0.5, "bundle_name": "site_test", "bundle_version": "0.0.1",
        "calibrate_volumes": True,  # on the DICOM validation folder
    })
    out = train(settings)
    meta = json.loads((out / METADATA_PATH).read_text())
    held = meta["training"]["held_out"]
    held_dirs = held_out_cases(node, 3, 0.5)
    assert held["study_uids"] == [d.name for d in held_dirs]
    assert sorted(held_dirs) in (sorted([a1, a2]), [b1])  # a patient's studies together
    trained = sorted(meta["training"]["train_cases"])
    assert trained == sorted(d.name for d in {a1, a2, b1} - set(held_dirs))
    assert held["train_study_uids"] == trained
    assert meta["training"]["val_cases"] == ["v1"]
    assert meta["network_settings"] == _demo_meta()["network_settings"]
    assert meta["training"]["init_weights_sha256"] == hashlib.sha256((DEMO / "models" / "model.pt").read_bytes()).hexdigest()
    assert meta["name"] == "site_test" and meta["training"]["iterations"] == 2
    assert meta["class_weights_calibration"]["cases"] == ["v1"]  # fitted on the DICOM validation case
    # the demo's low-confidence thresholds are carried, marked inherited, so a promoted site model keeps flagging
    demo_u = _demo_meta()["uncertainty"]
    assert meta["uncertainty"]["inherited"] is True and "inherited from the init bundle" in meta["uncertainty"]["how_chosen"]
    assert meta["uncertainty"]["mean_entropy_threshold"] == demo_u["mean_entropy_threshold"]
    import torch

    start = torch.load(DEMO / "models" / "model.pt", weights_only=True)
    tuned = torch.load(out / "models" / "model.pt", weights_only=True)
    assert start.keys() == tuned.keys() and not all(torch.equal(start[k], tuned[k]) for k in start)
    # what `thighnode model compare` will do: evaluate the bundle on the held-out case folders
    from modelkit.evaluation import evaluate_bundle

    report = evaluate_bundle(out, held_dirs, device="cpu")
    assert len(report.cases) == len(held_dirs) and all(d.name in name for d, name in zip(held_dirs, report.cases))
    assert {s.key for s in report.scores} >= {"sartorius", "femur"}
