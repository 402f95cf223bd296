"""[security] TLS and connection-defence keys, per-destination / prior TLS, and how the node
hands them to the ingress, the sender and the prior source."""

from __future__ import annotations

from pathlib import Path

import pytest

from thighnode.node import destinations_of, ingress_config_of
from thighnode.priors import PriorFinder
from thighnode.settings import ConfigError, load_settings


@pytest.fixture
def pem_files(tmp_path: Path) -> Path:
    """Placeholder files: load_settings checks that they exist; their content is checked at start."""
    for name in ("node.crt", "node.key", "ca.crt"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def _tls_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        "THIGHNODE_HOME": str(home),
        "THIGHNODE_SECURITY__TLS_PORT": "2762",
        "THIGHNODE_SECURITY__TLS_CERTIFICATE": "node.crt",
        "THIGHNODE_SECURITY__TLS_PRIVATE_KEY": "node.key",
        "THIGHNODE_SECURITY__TLS_CA_CERTIFICATES": "ca.crt",
        "THIGHNODE_SECURITY__TLS_REQUIRE_CLIENT_CERTIFICATE": "true",
    }
    env.update(extra)
    return env


def test_defaults_are_plain_only_with_a_short_associate_timeout(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.security.tls_port == 0 and s.security.tls is None and s.security.plain_port_enabled
    assert s.security.associate_timeout_s == 5.0
    assert s.security.max_connections_per_peer == 8
    config = ingress_config_of(s)
    assert config.tls is None and config.tls_port == 0
    assert config.associate_timeout_s == 5.0 and config.max_connections_per_peer == 8


def test_tls_keys_reach_the_ingress_the_destinations_and_the_prior_source(pem_files: Path) -> None:
    env = _tls_env(
        pem_files,
        THIGHNODE_DESTINATIONS='[{name = "tls", ae_title = "P", host = "pacs", port = 2762, tls = true},'
        ' {name = "plain", ae_title = "P", host = "pacs", port = 104}]',
        THIGHNODE_PRIOR__TLS="true",
        THIGHNODE_SECURITY__PLAIN_PORT_ENABLED="false",
    )
    s = load_settings(environ=env)
    tls = s.security.tls
    assert tls is not None
    assert tls.certificate == pem_files / "node.crt" and tls.ca_certificates == pem_files / "ca.crt"
    assert tls.require_client_certificate
    config = ingress_config_of(s)
    assert config.tls == tls and config.tls_port == 2762 and not config.plain_port_enabled
    destinations = destinations_of(s)
    assert destinations["tls"].tls == tls and destinations["plain"].tls is None
    assert "TLS" in destinations["tls"].label
    finder = PriorFinder(s, results=None, requests=None)  # type: ignore[arg-type] - only the source is asked
    assert finder.query_source().tls == tls


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"THIGHNODE_SECURITY__TLS_CERTIFICATE": '""'}, "security.tls_port = 2762: needs security.tls_certificate"),
        ({"THIGHNODE_SECURITY__TLS_CA_CERTIFICATES": '""'}, "tls_require_client_certificate = true: needs security.tls_ca_certificates"),
        ({"THIGHNODE_SECURITY__TLS_PRIVATE_KEY": "missing.key"}, "private_key"),
        ({"THIGHNODE_SECURITY__TLS_PORT": "11112"}, "security.tls_port = 11112: is node.port too"),
        ({"THIGHNODE_SECURITY__TLS_PORT": "0", "THIGHNODE_SECURITY__PLAIN_PORT_ENABLED": "false"}, "would not listen"),
        ({"THIGHNODE_SECURITY__ASSOCIATE_TIMEOUT_S": "0"}, "security.associate_timeout_s = 0.0"),
        ({"THIGHNODE_SECURITY__MAX_CONNECTIONS_PER_PEER": "0"}, "security.max_connections_per_peer = 0"),
        ({"THIGHNODE_DESTINATIONS": '[{name = "p", ae_title = "P", host = "h", port = 1, tls = "yes"}]'}, "destinations[0].tls"),
    ],
)
def test_invalid_tls_settings_are_refused_with_the_key(pem_files: Path, extra: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=_tls_env(pem_files, **extra))
    assert fragment in str(info.value)


def test_a_tls_destination_needs_the_node_certificate(tmp_path: Path) -> None:
    env = {
        "THIGHNODE_HOME": str(tmp_path),
        "THIGHNODE_DESTINATIONS": '[{name = "p", ae_title = "P", host = "h", port = 1, tls = true}]',
    }
    with pytest.raises(ConfigError, match=r"destinations\[0\] \(p\): tls = true needs security.tls_certificate"):
        load_settings(environ=env)
