"""scp.security: per-peer connection counts, the policy's validation, and the alert hook
that receives every refusal of the guarded listener."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from pynetdicom.sop_class import Verification

from scp.association import AssociationSettings, create_ae, start_server
from scp.security import ConnectionPolicy, PeerConnections, security_alert
from tests.support.ports import free_port


def test_peer_connections_count_per_address_up_to_the_limit() -> None:
    peers = PeerConnections(limit=2)
    assert peers.acquire("10.0.0.1") and peers.acquire("10.0.0.1")
    assert not peers.acquire("10.0.0.1")
    assert peers.acquire("10.0.0.2")
    peers.release("10.0.0.1")
    assert peers.count("10.0.0.1") == 1 and peers.acquire("10.0.0.1")
    for _ in range(3):
        peers.release("10.0.0.2")
    assert peers.count("10.0.0.2") == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"associate_timeout_s": 0}, "associate_timeout_s must be a finite number of seconds > 0; got 0"),
        ({"associate_timeout_s": float("inf")}, "got inf"),
        ({"max_connections_per_peer": 0}, "max_connections_per_peer must be an integer >= 1; got 0"),
    ],
)
def test_policy_refuses_values_out_of_range(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        ConnectionPolicy(peer_allowed=lambda _: True, **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_security_alert_logs_the_peer_address(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scp.security"):
        security_alert("192.0.2.7", "TLS handshake refused: CERTIFICATE_VERIFY_FAILED")
    assert caplog.messages == ["security: peer 192.0.2.7: TLS handshake refused: CERTIFICATE_VERIFY_FAILED"]


def test_every_refusal_reaches_the_policys_alert() -> None:
    seen: list[tuple[str, str]] = []
    policy = ConnectionPolicy(
        peer_allowed=lambda address: address != "127.0.0.2",
        associate_timeout_s=0.5,
        alert=lambda address, reason: seen.append((address, reason)),
    )
    ae = create_ae(AssociationSettings("GUARDED", 5.0, 5.0, 5.0))
    ae.add_supported_context(Verification)
    port = free_port()
    start_server(ae, "127.0.0.1", port, [], policy=policy)
    try:
        refused = socket.socket()
        refused.bind(("127.0.0.2", 0))
        refused.connect(("127.0.0.1", port))
        silent = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused.close()
        silent.close()
    finally:
        ae.shutdown()
    assert ("127.0.0.2", "connection refused at accept: peer address not in allowed_peers") in seen
    assert ("127.0.0.1", "no A-ASSOCIATE-RQ within 0.5 s (associate_timeout_s): closed") in seen
