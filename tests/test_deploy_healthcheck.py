"""deploy/healthcheck.py against real listeners on loopback: the node's ingress AE, one that rejects, none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploy.healthcheck import check, main
from scp.ae import start_ingress
from scp.index import InstanceIndex
from scp.types import IngressConfig
from tests.support.ports import free_port


@contextmanager
def _ingress(tmp_path: Path, port: int, allowed_calling_aets: tuple[str, ...] = ()) -> Iterator[None]:
    """The node's real ingress AE on loopback, stopped and its index closed afterwards."""
    config = IngressConfig(
        ae_title="THIGHNODE", host="127.0.0.1", port=port, spool_dir=tmp_path / "spool", db_path=tmp_path / "index.db",
        min_free_disk_mb=1,
        allowed_calling_aets=allowed_calling_aets,
    )
    index = InstanceIndex(config.db_path)
    server = start_ingress(config, index)
    try:
        yield
    finally:
        server.stop()
        index.close()


def test_the_node_answering_c_echo_is_healthy(tmp_path: Path) -> None:
    port = free_port()
    with _ingress(tmp_path, port):
        assert check("127.0.0.1", port, "THIGHNODE", 5.0) == (True, f"THIGHNODE@127.0.0.1:{port} answered C-ECHO: success")


def test_a_node_that_rejects_the_health_check_by_its_allow_list_is_up(tmp_path: Path) -> None:
    port = free_port()
    with _ingress(tmp_path, port, allowed_calling_aets=("CT1",)):
        healthy, message = check("127.0.0.1", port, "THIGHNODE", 5.0)
    assert healthy and "association rejected by its allow-lists" in message


def test_nothing_listening_is_unhealthy_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    healthy, message = check("127.0.0.1", port, "THIGHNODE", 2.0)
    assert not healthy and message.startswith(f"THIGHNODE@127.0.0.1:{port}")
    monkeypatch.setenv("THIGHNODE_NODE__PORT", str(port))
    monkeypatch.setenv("THIGHNODE_NODE__HOST", "0.0.0.0")
    assert main(["--timeout", "2"]) == 1
    assert f"unhealthy: THIGHNODE@127.0.0.1:{port}" in capsys.readouterr().err
