"""Bundles: write -> load gives the same outputs; refusals name what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.bundle import INFERENCE_PATH, METADATA_PATH, MODEL_PATH, load_bundle, write_bundle
from pipeline.errors import BundleError
from pipeline.labels import LabelTable, load_label_table
from pipeline.network import NetworkSettings, build_network
from pipeline.preprocess import PreprocessSettings

torch.set_num_threads(1)

TINY = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)
PRE = PreprocessSettings(spacing_mm=(4.0, 4.0, 4.0))


def _write(tmp_path: Path, labels: LabelTable) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_network(TINY, labels.num_classes)
    out = write_bundle(tmp_path / "b", net, TINY, PRE, labels, {"name": "tiny", "version": "0.0.1", "training": {"seed": 0}})
    return out, net


def test_write_load_same_outputs(tmp_path: Path) -> None:
    labels = load_label_table()
    path, net = _write(tmp_path, labels)
    bundle = load_bundle(path, labels, "cpu")
    assert (bundle.name, bundle.version) == ("tiny", "0.0.1")
    assert bundle.network_settings == TINY and bundle.preprocess_settings == PRE
    assert not bundle.network.training
    x = torch.rand(1, 1, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), bundle.network(x), atol=1e-6)
    meta = json.loads((path / METADATA_PATH).read_text())
    assert "NOT FOR CLINICAL USE" in meta["intended_use"]
    assert meta["authors"] == "thighnode" and meta["labels"] == labels.to_records()


def test_inference_config_parses_with_monai(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNETR

    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    parser = ConfigParser()
    parser.read_config(str(path / INFERENCE_PATH))
    assert isinstance(parser.get_parsed_content("network_def"), UNETR)
    assert parser.get_parsed_content("inferer").roi_size == [32, 32, 32]
    assert parser["network_def"]["_target_"] == "monai.networks.nets.UNETR"


def test_refuses_label_table_mismatch(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    fewer = LabelTable(labels.labels[:-1])
    with pytest.raises(BundleError, match="count: node has 28 structures, bundle has 29"):
        load_bundle(path, fewer, "cpu")
    records = labels.to_records()
    records[2]["key"] = "vastus_lateralis_renamed"
    renamed = LabelTable.from_records(records)
    with pytest.raises(BundleError, match="id 3: node key 'vastus_lateralis_renamed', bundle key 'vastus_lateralis'"):
        load_bundle(path, renamed, "cpu")


def test_refuses_missing_file(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    (path / MODEL_PATH).unlink()
    with pytest.raises(BundleError, match="models/model.pt is missing"):
        load_bundle(path, labels, "cpu")


def test_refuses_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    other = build_network(NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=64, mlp_dim=96, num_heads=2),
                          labels.num_classes)
    torch.save(other.state_dict(), path / MODEL_PATH)
    with pytest.raises(BundleError, match="does not fit the UNETR"):
        load_bundle(path, labels, "cpu")


def test_metadata_needs_name(tmp_path: Path) -> None:
    labels = load_label_table()
    with pytest.raises(BundleError, match="'name'"):
        write_bundle(tmp_path / "b", build_network(TINY, labels.num_classes), TINY, PRE, labels, {"version": "1"})


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("overlap", 0.75, "inferer.overlap = 0.75"),
        ("mode", "constant", "inferer.mode = 'constant'"),
        ("sw_batch_size", 8, "inferer.sw_batch_size = 8"),
        ("roi_size", [64, 64, 64], "inferer.roi_size = [64, 64, 64]"),
    ],
)
def test_refuses_inferer_that_disagrees_with_metadata(tmp_path: Path, key: str, value, named: str) -> None:
    # A site that edits the MONAI inferer in inference.json (the usual place) must not be ignored silently:
    # the node runs what metadata.json says, so a disagreement is refused with both values named.
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    config = json.loads((path / INFERENCE_PATH).read_text())
    config["inferer"][key] = value
    (path / INFERENCE_PATH).write_text(json.dumps(config))
    with pytest.raises(BundleError) as err:
        load_bundle(path, labels, "cpu")
    assert named in str(err.value) and str(METADATA_PATH) in str(err.value)


def test_refuses_preprocessing_that_disagrees_with_metadata(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    config = json.loads((path / INFERENCE_PATH).read_text())
    config["preprocessing_settings"]["spacing_mm"] = [1.5, 1.5, 1.5]
    (path / INFERENCE_PATH).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"preprocessing_settings\.spacing_mm = \[1\.5, 1\.5, 1\.5\]"):
        load_bundle(path, labels, "cpu")


def test_bundle_without_inferer_block_still_loads(tmp_path: Path) -> None:
    # inferer and preprocessing_settings are informative copies; a hand-made bundle may leave them out.
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    config = json.loads((path / INFERENCE_PATH).read_text())
    del config["inferer"], config["preprocessing_settings"]
    (path / INFERENCE_PATH).write_text(json.dumps(config))
    assert load_bundle(path, labels, "cpu").sliding_window.overlap == 0.5


def test_refuses_network_def_that_disagrees_with_metadata(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    config = json.loads((path / INFERENCE_PATH).read_text())
    config["network_def"]["num_heads"] = 4
    (path / INFERENCE_PATH).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"network_def\.num_heads = 4 but .*metadata\.json network_settings says 2"):
        load_bundle(path, labels, "cpu")


def _set_metadata(path: Path, **changes: object) -> None:
    meta = json.loads((path / METADATA_PATH).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / METADATA_PATH).write_text(json.dumps(meta))


def test_demonstration_flag_is_read_from_the_metadata(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    assert json.loads((path / METADATA_PATH).read_text())["demonstration"] is True  # default intended use
    assert load_bundle(path, labels, "cpu").demonstration is True
    _set_metadata(path, demonstration=False)
    assert load_bundle(path, labels, "cpu").demonstration is False


def test_demonstration_flag_absent_means_false(tmp_path: Path) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    _set_metadata(path, demonstration=None)
    assert load_bundle(path, labels, "cpu").demonstration is False


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_demonstration_flag_must_be_a_json_boolean(tmp_path: Path, value: object) -> None:
    labels = load_label_table()
    path, _ = _write(tmp_path, labels)
    _set_metadata(path, demonstration=value)
    with pytest.raises(BundleError, match=r"configs/metadata.json demonstration = .*allowed: true or false"):
        load_bundle(path, labels, "cpu")


def test_write_bundle_takes_the_demonstration_flag(tmp_path: Path) -> None:
    labels = load_label_table()
    net = build_network(TINY, labels.num_classes)
    site = {"name": "site", "version": "1.0.0", "intended_use": "Research use at site X."}
    path = write_bundle(tmp_path / "site", net, TINY, PRE, labels, site)
    assert load_bundle(path, labels, "cpu").demonstration is False
    path = write_bundle(tmp_path / "demo", net, TINY, PRE, labels, site, demonstration=True)
    assert load_bundle(path, labels, "cpu").demonstration is True
    with pytest.raises(BundleError, match="'demonstration' is 'no'"):
        write_bundle(tmp_path / "bad", net, TINY, PRE, labels, {**site, "demonstration": "no"})


def test_a_bundle_written_with_the_demonstration_statement_is_a_demonstration_model(tmp_path: Path) -> None:
    """thighnode train writes the intended use it is given; the default is the demonstration statement."""
    from pipeline.bundle import DEMO_INTENDED_USE

    labels = load_label_table()
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path / "d", net, TINY, PRE, labels,
                        {"name": "d", "version": "1", "intended_use": DEMO_INTENDED_USE})
    assert load_bundle(path, labels, "cpu").demonstration is True


def test_the_shipped_bundle_is_a_demonstration_model() -> None:
    root = Path(__file__).resolve().parents[2]
    meta = json.loads((root / "bundles" / "thighnode_demo" / METADATA_PATH).read_text())
    assert meta["demonstration"] is True


def test_the_weights_sha256_is_that_of_the_file_loaded_and_reaches_the_segmentation(tmp_path: Path) -> None:
    """Bundle.weights_sha256 names the exact weights: the file's digest; the Segmenter hands it to every
    Segmentation (the SEG, SR and PDF print it); other weights give another digest."""
    import hashlib

    import numpy as np

    from pipeline.bundle import weights_sha256
    from pipeline.inference import Segmenter
    from pipeline.types import Volume

    labels = load_label_table()
    path, net = _write(tmp_path, labels)
    expected = hashlib.sha256((path / MODEL_PATH).read_bytes()).hexdigest()
    bundle = load_bundle(path, labels, "cpu")
    assert bundle.weights_sha256 == expected == weights_sha256(path)
    hu = np.full((8, 12, 12), -1000.0, dtype=np.float32)
    hu[2:6, 3:9, 3:9] = 50.0
    volume = Volume(hu=hu, affine_lps=np.diag([4.0, 4.0, 4.0, 1.0]), frame_of_reference_uid="", study_instance_uid="",
                    series_instance_uid="1.2.3", sop_class_uid="", sop_instance_uids=())
    assert Segmenter(bundle, device="cpu").segment(volume).model_sha256 == expected
    state = {k: v.clone() for k, v in net.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] += 1e-3
    torch.save(state, path / MODEL_PATH)
    assert load_bundle(path, labels, "cpu").weights_sha256 not in ("", expected)
