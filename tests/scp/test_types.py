"""scp.types: IngressConfig validation messages and the frozen hand-off types."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from node_errors import NodeError
from scp.errors import IngressConfigError
from scp.types import IngressConfig, ReceivedStudy


def _config(**overrides: object) -> IngressConfig:
    values: dict[str, object] = {
        "ae_title": "THIGHNODE",
        "host": "127.0.0.1",
        "port": 11112,
        "spool_dir": Path("/tmp/spool"),
        "db_path": Path("/tmp/db"),
    }
    values.update(overrides)
    return IngressConfig(**values)  # type: ignore[arg-type]


def test_valid_config_is_normalised() -> None:
    config = _config(
        ae_title=" THIGHNODE ",
        spool_dir="/var/spool/x",
        allowed_calling_aets=["CT1", "PACS "],
        allowed_peers=["10.0.0.0/8", "::1", "192.168.1.7"],
    )
    assert config.ae_title == "THIGHNODE"
    assert config.spool_dir == Path("/var/spool/x")
    assert config.allowed_calling_aets == ("CT1", "PACS")
    assert config.allowed_peers == ("10.0.0.0/8", "::1", "192.168.1.7")
    with pytest.raises(FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"ae_title": ""}, ["ae_title", "0 characters", "1 to 16"]),
        ({"ae_title": "A" * 17}, ["ae_title", "17 characters", "'AAAAAAAAAAAAAAAAA'", "1 to 16"]),
        ({"ae_title": "THIGH\\NODE"}, ["ae_title", "'\\\\'", "no backslash"]),
        ({"ae_title": "THIGH\nNODE"}, ["ae_title", "'\\n'", "printable"]),
        ({"ae_title": "    "}, ["ae_title", "only spaces"]),
        ({"ae_title": 7}, ["ae_title", "must be a string", "7"]),
        ({"port": 0}, ["port", "0", "1..65535"]),
        ({"port": 70000}, ["port", "70000", "1..65535"]),
        ({"port": "104"}, ["port", "'104'", "integer"]),
        ({"allowed_calling_aets": ["OK", "X" * 20]}, ["allowed_calling_aets", "20 characters"]),
        ({"allowed_calling_aets": "CT1"}, ["allowed_calling_aets", "not a string", "'CT1'"]),
        ({"allowed_peers": ["10.0.0.300"]}, ["allowed_peers", "'10.0.0.300'", "CIDR"]),
        ({"allowed_peers": ["10.0.0.5/24"]}, ["allowed_peers", "'10.0.0.5/24'", "no host bits set"]),
        ({"allowed_peers": "10.0.0.0/8"}, ["allowed_peers", "not a string"]),
        ({"min_free_disk_mb": -1}, ["min_free_disk_mb", "-1", ">= 0"]),
        ({"acse_timeout_s": 0}, ["acse_timeout_s", "0", "> 0"]),
        ({"dimse_timeout_s": float("inf")}, ["dimse_timeout_s", "inf", "finite"]),
        ({"network_timeout_s": "30"}, ["network_timeout_s", "'30'"]),
        ({"maximum_pdu_size": 100}, ["maximum_pdu_size", "100", "0 (no limit) or 4096"]),
        ({"maximum_associations": 0}, ["maximum_associations", "0", ">= 1"]),
        ({"spool_dir": ""}, ["spool_dir", "non-empty path"]),
    ],
)
def test_invalid_values_name_field_value_and_rule(overrides: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(IngressConfigError) as info:
        _config(**overrides)
    assert isinstance(info.value, NodeError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_peer_allow_list() -> None:
    anyone = _config()
    assert anyone.peer_allowed("203.0.113.9")
    config = _config(allowed_peers=("10.0.0.0/8", "192.168.1.7", "fd00::/8"))
    assert config.peer_allowed("10.200.3.4")
    assert config.peer_allowed("192.168.1.7")
    assert not config.peer_allowed("192.168.1.8")
    assert config.peer_allowed("fd00::1")
    assert not config.peer_allowed("::1")
    assert config.peer_allowed("::ffff:10.1.2.3")  # IPv4-mapped, from a dual-stack socket
    assert not config.peer_allowed("not-an-address")


def test_received_study_is_immutable() -> None:
    series = {"1.2": [Path("/a.dcm")]}
    study = ReceivedStudy("1", ("A",), series, {"SR": 1}, 2, 5.0)
    series["1.2"].append(Path("/b.dcm"))
    assert study.series["1.2"] == (Path("/a.dcm"),)
    with pytest.raises(TypeError):
        study.excluded_counts["OT"] = 1  # type: ignore[index]
