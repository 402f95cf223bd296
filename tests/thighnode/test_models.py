"""The model registry (thighnode.models) and `thighnode model promote / rollback / list`, `thighnode status`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from thighnode.cli import main, status_report
from thighnode.models import HISTORY_FILE, models_dir, model_status, read_history
from thighnode.settings import load_settings

DEMO = REPO_ROOT / "bundles" / "thighnode_demo"


def _sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()


def make_site_bundle(out: Path, version: str = "0.9.1-site", delta: float = 1e-3) -> Path:
    """A copy of the demo bundle with other weights (one tensor shifted) and another version."""
    shutil.copytree(DEMO, out)
    meta_path = out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = version
    meta_path.write_text(json.dumps(meta, indent=2))
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
    state[first] = state[first] + delta
    torch.save(state, out / "models" / "model.pt")
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    configured = root / "configured"
    shutil.copytree(DEMO, configured)
    return {"configured": configured, "site": make_site_bundle(root / "site")}


@pytest.fixture
def config(tmp_path: Path, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("THIGHNODE_NODE__DATA_DIR", "THIGHNODE_MODEL__BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[model]\nbundle = "{bundles["configured"]}"\n'
                    'device = "cpu"\n')
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _active(config: Path) -> dict:
    return status_report(load_settings(config, environ={}))["model"]["active"]


def test_promote_list_status_and_rollback_back_to_the_configured_bundle(
    config: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(config)
    data_dir = load_settings(config, environ={}).node.data_dir
    site_sha, demo_sha = _sha(bundles["site"]), _sha(bundles["configured"])
    assert site_sha != demo_sha
    assert _active(config) | {"path": ""} == {"path": "", "source": "configured", "name": "thighnode_demo",
                                               "version": "0.9.0", "sha256": demo_sha}

    code, out, err = _run(capsys, "model", "promote", "--config", cfg, str(bundles["site"]))
    assert code == 0, err
    assert f"promoted thighnode_demo 0.9.1-site  sha256 {site_sha}" in out
    installed = models_dir(data_dir) / f"thighnode_demo-0.9.1-site-{site_sha[:12]}"
    assert _sha(installed) == site_sha and (installed / "configs" / "metadata.json").is_file()
    active = _active(config)
    assert (active["source"], active["version"], active["sha256"], active["path"]) == (
        "promoted", "0.9.1-site", site_sha, str(installed))

    code, out, err = _run(capsys, "model", "promote", "--config", cfg, str(bundles["configured"]))
    assert code == 0, err
    assert _active(config)["sha256"] == demo_sha and _active(config)["source"] == "promoted"

    history = json.loads((models_dir(data_dir) / HISTORY_FILE).read_text())["entries"]
    assert [e["action"] for e in history] == ["promote", "promote"]
    first, second = history
    assert first["model"]["sha256"] == site_sha and first["previous"] is None
    assert first["source_path"] == str(bundles["site"].resolve()) and first["user"] and first["time"].endswith("Z")
    assert second["previous"]["sha256"] == site_sha and second["model"]["version"] == "0.9.0"

    code, out, _ = _run(capsys, "model", "list", "--config", cfg)
    assert code == 0
    listed = [line for line in out.splitlines() if "  promote  -> " in line]
    assert len(listed) == 2 and listed[1].lstrip().startswith("*") and not listed[0].lstrip().startswith("*")
    assert "source: promoted" in out.splitlines()[0]

    code, out, _ = _run(capsys, "status", "--config", cfg)
    assert code == 0
    assert f"model: thighnode_demo 0.9.0  sha256 {demo_sha}  source: promoted" in out

    code, out, _ = _run(capsys, "model", "rollback", "--config", cfg)
    assert code == 0 and "active now: thighnode_demo 0.9.1-site" in out
    assert _active(config)["sha256"] == site_sha
    code, out, _ = _run(capsys, "model", "rollback", "--config", cfg)
    assert code == 0 and "active now: the configured bundle" in out
    active = _active(config)
    assert (active["source"], active["path"]) == ("configured", str(bundles["configured"]))
    code, out, err = _run(capsys, "model", "rollback", "--config", cfg)
    assert code == 2 and out == ""
    assert err.startswith("error: nothing to roll back") and err.count("\n") == 1
    assert [e.action for e in read_history(data_dir)] == ["promote", "promote", "rollback", "rollback"]
    code, out, _ = _run(capsys, "model", "list", "--json", "--config", cfg)
    listed = json.loads(out)
    assert listed["active"]["source"] == "configured" and not any(r["active"] for r in listed["history"])


def _broken_weights(root: Path) -> Path:
    bad = root / "bad_weights"
    shutil.copytree(DEMO, bad)
    state = torch.load(bad / "models" / "model.pt", map_location="cpu", weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, bad / "models" / "model.pt")
    return bad


def _broken_labels(root: Path) -> Path:
    bad = root / "bad_labels"
    shutil.copytree(DEMO, bad)
    meta_path = bad / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = meta["labels"][:-1]
    meta_path.write_text(json.dumps(meta))
    return bad


def _not_a_state_dict(root: Path) -> Path:
    bad = root / "garbage"
    shutil.copytree(DEMO, bad)
    (bad / "models" / "model.pt").write_bytes(b"not a torch file\n")
    return bad


@pytest.mark.parametrize("make, says", [
    (_broken_weights, "does not fit the UNETR"),
    (_broken_labels, "does not match the node's label table"),
    (_not_a_state_dict, "cannot be read as a state dict"),
    (lambda root: root / "missing", "is not a folder"),
])
def test_a_broken_bundle_is_refused_with_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make, says: str
) -> None:
    bad = make(tmp_path)
    code, out, err = _run(capsys, "model", "promote", "--config", str(config), str(bad))
    assert code == 2 and out == ""
    assert err.startswith("error: not promoted: ") and says in err and err.count("\n") == 1, err
    data_dir = load_settings(config, environ={}).node.data_dir
    assert read_history(data_dir) == []
    assert not any(p.name.startswith("thighnode_demo") for p in models_dir(data_dir).glob("*"))
    assert _active(config)["source"] == "configured"


def test_the_node_loads_the_promoted_model_and_status_tells_loaded_from_active(
    config: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from thighnode.node import Node

    cfg = str(config)
    assert _run(capsys, "model", "promote", "--config", cfg, str(bundles["site"]))[0] == 0
    settings = load_settings(config, environ={})
    segmenter = Node(settings)._build_segmenter()
    site_sha = _sha(bundles["site"])
    assert segmenter.bundle.weights_sha256 == site_sha and segmenter.bundle.version == "0.9.1-site"
    status = model_status(settings)
    assert status["loaded"]["running"] and status["loaded"]["sha256"] == site_sha
    assert status["loaded"]["source"] == "promoted"
    assert "uses the active model" in status["summary"]

    assert _run(capsys, "model", "rollback", "--config", cfg)[0] == 0
    status = model_status(settings)
    assert status["active"]["source"] == "configured" and status["loaded"]["sha256"] == site_sha
    assert "0.9.1-site" in status["summary"] and "takes effect at its next start" in status["summary"]
    code, out, _ = _run(capsys, "status", "--config", cfg)
    assert "source: configured" in out and "last loaded by a node (running" in out
    assert "the active model takes effect at its next start" in out


def test_a_changed_registry_copy_stops_the_node_at_start(
    config: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from thighnode.node import Node, NodeStartError

    assert _run(capsys, "model", "promote", "--config", str(config), str(bundles["site"]))[0] == 0
    settings = load_settings(config, environ={})
    installed = models_dir(settings.node.data_dir) / f"thighnode_demo-0.9.1-site-{_sha(bundles['site'])[:12]}"
    shutil.copy(bundles["configured"] / "models" / "model.pt", installed / "models" / "model.pt")
    with pytest.raises(NodeStartError, match="the copy was changed"):
        Node(settings)._build_segmenter()


def test_promoting_an_earlier_model_again_reuses_its_copy(
    config: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(config)
    for name in ("site", "configured", "site"):
        code, _, err = _run(capsys, "model", "promote", "--config", cfg, str(bundles[name]))
        assert code == 0, err
    data_dir = load_settings(config, environ={}).node.data_dir
    copies = sorted(p.name for p in models_dir(data_dir).iterdir() if p.is_dir())
    assert copies == [f"thighnode_demo-0.9.0-{_sha(bundles['configured'])[:12]}",
                      f"thighnode_demo-0.9.1-site-{_sha(bundles['site'])[:12]}"]
    assert _active(config)["sha256"] == _sha(bundles["site"])
    assert _run(capsys, "model", "rollback", "--config", cfg)[0] == 0
    assert _active(config)["sha256"] == _sha(bundles["configured"])
