"""Association-level defence of the ingress (scp.security, scp.association's guarded
server): idle and half-open connections, floods from disallowed and allowed peers,
and the TLS handshake kept off the accept loop."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from scp.tls import TlsConfig
from tests.conftest import require_tool
from tests.scp.dicom_factory import write_ct
from tests.scp.tools import AE_TITLE, echo, run_tool
from tests.support.certs import make_pki
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@contextmanager
def idle_sockets(port: int, count: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``count`` TCP connections from ``source`` that never send a byte; closed on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((source, 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()



def _closed_by_server(s: socket.socket, wait_s: float) -> bool:
    s.settimeout(wait_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _storescu(port: int, files: list[Path]):
    return run_tool(
        require_tool("storescu"), "-aet", "CTSCANNER", "-aec", AE_TITLE, "127.0.0.1", port, *files, timeout_s=60
    )


def test_closed_idle_sockets_free_their_association_slots(start_server) -> None:
    """Regression (issue 25): sockets closed without an A-ASSOCIATE-RQ kept their slot for the
    whole ACSE timeout, so the next association was rejected ("maximum number of associations")."""
    server = start_server(maximum_associations=2, acse_timeout_s=30.0)
    with idle_sockets(server.port, 3):
        time.sleep(0.3)
    time.sleep(0.3)
    assert echo(server.port)


def test_idle_sockets_take_no_association_slot(start_server) -> None:
    server = start_server(maximum_associations=2, acse_timeout_s=30.0, associate_timeout_s=20.0)
    with idle_sockets(server.port, 5):
        assert echo(server.port)
        assert echo(server.port)


def test_flood_from_a_disallowed_address_does_not_keep_an_allowed_sender_out(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """50 idle sockets from 127.0.0.2 (not allowed), then storescu from 127.0.0.1: stored."""
    server = start_server(allowed_peers=("127.0.0.1",), maximum_associations=16)
    study = generate_uid()
    files = [write_ct(tmp_path / f"ct{i}.dcm", study, "1.2.3.4.5") for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="scp"), idle_sockets(server.port, 50, "127.0.0.2") as flood:
        assert len(flood) == 50
        result = _storescu(server.port, files)
        assert result.returncode == 0, result.stderr
        assert len(server.index.instances(study)) == 5
        assert all(_closed_by_server(s, 5.0) for s in flood)
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security: peer 127.0.0.2")]
    assert refused and all("allowed_peers" in line for line in refused)
    assert not any("127.0.0.1" in r.getMessage() for r in caplog.records if r.getMessage().startswith("security:"))


def test_flood_from_an_allowed_address_is_bounded_per_peer_and_timed_out(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(
        allowed_peers=("127.0.0.0/8",), maximum_associations=4, max_connections_per_peer=4, associate_timeout_s=1.0
    )
    study = generate_uid()
    files = [write_ct(tmp_path / f"ct{i}.dcm", study, "1.2.3.4.5") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="scp"), idle_sockets(server.port, 50, "127.0.0.3") as flood:
        result = _storescu(server.port, files)
        assert result.returncode == 0, result.stderr
        assert len(server.index.instances(study)) == 3
        # Every flood socket ends, at accept (per-peer limit: 4 held at once) or after
        # associate_timeout_s; which of the two depends on when the listener accepts it.
        assert all(_closed_by_server(s, 10.0) for s in flood)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security: peer 127.0.0.3")]
    at_limit = sum("max_connections_per_peer" in line for line in lines)
    timed_out = sum("no A-ASSOCIATE-RQ within 1 s" in line for line in lines)
    assert at_limit + timed_out == 50 == len(lines)
    assert at_limit > 0 and timed_out >= 4


def test_half_sent_associate_request_is_dropped(start_server) -> None:
    """A peer that starts an A-ASSOCIATE-RQ and stalls holds its slot only for associate_timeout_s."""
    server = start_server(maximum_associations=1, acse_timeout_s=30.0, associate_timeout_s=1.0)
    stalled = socket.create_connection(("127.0.0.1", server.port))
    try:
        stalled.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x01]))  # type, length 256, 2 bytes
        assert _closed_by_server(stalled, 10.0)
        assert echo(server.port)
    finally:
        stalled.close()


def test_silent_tls_clients_do_not_block_the_tls_listener(start_server, tmp_path: Path) -> None:
    """The handshake runs on the connection's thread: 20 sockets that never send a
    ClientHello do not stop another client's handshake."""
    pki = make_pki(tmp_path / "pki")
    tls = TlsConfig(pki.server.certificate, pki.server.private_key, pki.ca, require_client_certificate=True)
    server = start_server(tls=tls, tls_port=free_port(), associate_timeout_s=30.0, max_connections_per_peer=64)
    with idle_sockets(server.config.tls_port, 20):
        result = run_tool(
            require_tool("echoscu"), "+tls", pki.client.private_key, pki.client.certificate, "+cf", pki.ca,
            "-to", "10", "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", server.config.tls_port, timeout_s=60,
        )
    assert result.returncode == 0, result.stderr
