"""DICOM TLS (PS3.15 Annex B) at the ingress, driven by dcmtk (echoscu / storescu +tls),
and the start-up checks of the certificate files."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Verification

from scp.association import AssociationSettings, RemoteAE, create_ae, request_association
from scp.errors import TlsConfigError
from scp.tls import TlsConfig, check_tls_files, client_context, server_context
from tests.conftest import require_tool
from tests.scp.dicom_factory import write_ct
from tests.scp.tools import AE_TITLE, run_tool
from tests.support.certs import Pki, make_pki
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki: Pki, *, mutual: bool = True) -> TlsConfig:
    return TlsConfig(pki.server.certificate, pki.server.private_key, pki.ca, require_client_certificate=mutual)


def _tls_options(pki: Pki, client: str) -> tuple[str, ...]:
    """dcmtk's TLS options: the server must present a certificate from our CA (+cf)."""
    if client == "none":
        return ("+tla", "+cf", str(pki.ca))
    pair = {"valid": pki.client, "expired": pki.expired_client, "foreign": pki.foreign_client}[client]
    return ("+tls", str(pair.private_key), str(pair.certificate), "+cf", str(pki.ca))


def _echoscu(port: int, *options: str):
    return run_tool(require_tool("echoscu"), "-v", *options, "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", port)


def _security_lines(caplog: pytest.LogCaptureFixture, fragment: str, timeout_s: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security:")]
        if any(fragment in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_echoscu_with_a_valid_client_certificate_is_accepted(start_server, pki: Pki) -> None:
    server = start_server(tls=_server_tls(pki), tls_port=free_port())
    result = _echoscu(server.config.tls_port, *_tls_options(pki, "valid"))
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr
    assert server.server.tls_address == ("127.0.0.1", server.config.tls_port)


@pytest.mark.parametrize(
    ("client", "why"),
    [
        ("none", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("expired", "certificate has expired"),
        ("foreign", "unable to get local issuer certificate"),
    ],
)
def test_mutual_tls_refuses_a_missing_expired_or_foreign_client_certificate(
    start_server, pki: Pki, client: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(tls=_server_tls(pki), tls_port=free_port())
    with caplog.at_level(logging.WARNING, logger="scp"):
        result = _echoscu(server.config.tls_port, *_tls_options(pki, client))
        lines = _security_lines(caplog, why)
    assert result.returncode != 0
    assert "Received Echo Response" not in result.stderr
    assert any(line.startswith("security: peer 127.0.0.1: TLS handshake refused") and why in line for line in lines), lines
    # The listener is still serving: a valid client gets through afterwards.
    assert _echoscu(server.config.tls_port, *_tls_options(pki, "valid")).returncode == 0


def test_without_mutual_mode_an_anonymous_client_is_served(start_server, pki: Pki) -> None:
    server = start_server(tls=_server_tls(pki, mutual=False), tls_port=free_port())
    result = _echoscu(server.config.tls_port, *_tls_options(pki, "none"))
    assert result.returncode == 0, result.stderr


def test_storescu_over_tls_stores_the_instance(start_server, pki: Pki, tmp_path: Path) -> None:
    server = start_server(tls=_server_tls(pki), tls_port=free_port())
    study = generate_uid()
    files = [write_ct(tmp_path / f"ct{i}.dcm", study, "1.2.3.4.5") for i in range(3)]
    result = run_tool(
        require_tool("storescu"), *_tls_options(pki, "valid"), "-aet", "CTSCANNER", "-aec", AE_TITLE,
        "127.0.0.1", server.config.tls_port, *files,
    )
    assert result.returncode == 0, result.stderr
    stored = server.index.instances(study)
    assert len(stored) == 3
    assert {inst.peer_address for inst in stored} == {"127.0.0.1"}


def test_plain_and_tls_ports_side_by_side_or_tls_only(start_server, pki: Pki) -> None:
    both = start_server(tls=_server_tls(pki), tls_port=free_port())
    assert _echoscu(both.port).returncode == 0
    assert _echoscu(both.config.tls_port, *_tls_options(pki, "valid")).returncode == 0
    # A plain client on the TLS port does not get an association (its A-ASSOCIATE-RQ is no handshake).
    assert _echoscu(both.config.tls_port).returncode != 0

    tls_only = start_server(tls=_server_tls(pki), tls_port=free_port(), plain_port_enabled=False)
    assert _echoscu(tls_only.config.tls_port, *_tls_options(pki, "valid")).returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tls_only.port), timeout=2).close()


def test_requestor_verifies_the_server_certificate(start_server, pki: Pki) -> None:
    """Our side as TLS client (sender, Q/R): trusted CA -> established; foreign trust -> no association."""
    server = start_server(tls=_server_tls(pki), tls_port=free_port())
    node_identity = (pki.client.certificate, pki.client.private_key)
    ae = create_ae(AssociationSettings.with_timeout("TLSCLIENT", 10.0))
    ae.add_requested_context(Verification)

    trusted = client_context(TlsConfig(*node_identity, ca_certificates=pki.ca))
    assoc = request_association(ae, RemoteAE(AE_TITLE, "127.0.0.1", server.config.tls_port, trusted))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    wrong_trust = client_context(TlsConfig(*node_identity, ca_certificates=pki.foreign_ca))
    refused = request_association(ae, RemoteAE(AE_TITLE, "127.0.0.1", server.config.tls_port, wrong_trust))
    assert not refused.is_established


def test_contexts_allow_tls_1_2_and_later_with_aead_suites_only(pki: Pki) -> None:
    for context in (server_context(_server_tls(pki)), client_context(_server_tls(pki))):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12, "no TLS 1.2 suite left"
        assert all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12), tls12


def test_missing_file_is_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"private_key .*nope\.key does not exist"):
        TlsConfig(pki.server.certificate, tmp_path / "nope.key")


def test_key_that_does_not_fit_the_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match=r"server\.crt and private key .*client\.key cannot be used together"):
        check_tls_files(TlsConfig(pki.server.certificate, pki.client.private_key, pki.ca))


def test_expired_certificate_is_refused_at_start(pki: Pki, start_server) -> None:
    expired = TlsConfig(pki.expired_client.certificate, pki.expired_client.private_key, pki.ca)
    with pytest.raises(TlsConfigError, match=r"expired\.crt is valid from .* renew it"):
        check_tls_files(expired)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=60)
    with pytest.raises(TlsConfigError, match="renew it"):
        check_tls_files(_server_tls(pki), now=later)
    with pytest.raises(TlsConfigError, match="renew it"):
        start_server(tls=expired, tls_port=free_port())


def test_mutual_mode_needs_a_trust_store(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="require_client_certificate is true but no ca_certificates"):
        TlsConfig(pki.server.certificate, pki.server.private_key, None, require_client_certificate=True)
