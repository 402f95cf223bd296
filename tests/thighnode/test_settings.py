"""Configuration: defaults, file over defaults, environment overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from thighnode.settings import ConfigError, load_settings


def test_defaults_load_and_match_documented_values(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.node.ae_title == "THIGHNODE"
    assert s.node.port == 11112
    assert s.node.quiet_period_s == 30
    assert s.node.data_dir == tmp_path / "var"
    assert s.security.allowed_calling_aets == ()
    assert s.destinations == ()
    assert s.db_path == tmp_path / "var" / "thighnode.db"


def test_the_field_of_view_policy_defaults_accept_hip_and_thigh_and_can_be_set(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.processing.accept_regions == ("hip", "thigh")
    assert s.processing.min_region_mm == 20.0
    s = load_settings(environ={"THIGHNODE_PROCESSING__ACCEPT_REGIONS": '["thigh"]', "THIGHNODE_PROCESSING__MIN_REGION_MM": "60"})
    assert s.processing.accept_regions == ("thigh",) and s.processing.min_region_mm == 60.0


def test_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[node]\nport = 4000\n[security]\nallowed_calling_aets = ["CT1"]\nallowed_peers = ["10.1.0.0/16", "127.0.0.1"]\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    s = load_settings(cfg, environ={})
    assert s.node.port == 4000
    assert s.node.ae_title == "THIGHNODE"
    assert s.security.allowed_calling_aets == ("CT1",)
    assert s.security.allowed_peers == ("10.1.0.0/16", "127.0.0.1/32")
    assert s.destination("pacs").port == 4242


def test_environment_overrides_a_key(tmp_path: Path) -> None:
    s = load_settings(
        environ={
            "THIGHNODE_NODE__PORT": "11113",
            "THIGHNODE_NODE__AE_TITLE": "NODE2",
            "THIGHNODE_SECURITY__ALLOWED_CALLING_AETS": '["A", "B"]',
            "THIGHNODE_DESTINATIONS": '[{name = "p", ae_title = "P", host = "127.0.0.1", port = 104}]',
        }
    )
    assert s.node.port == 11113
    assert s.node.ae_title == "NODE2"
    assert s.security.allowed_calling_aets == ("A", "B")
    assert s.destinations[0].ae_title == "P"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"THIGHNODE_NODE__PORT": "70000"}, "node.port = 70000: allowed 1..65535"),
        ({"THIGHNODE_NODE__PORT": "abc"}, "node.port = 'abc': must be an integer"),
        ({"THIGHNODE_NODE__AE_TITLE": "A" * 17}, "17 characters long ('AAAAAAAAAAAAAAAAA'); allowed: 1 to 16 printable ASCII characters"),
        ({"THIGHNODE_NODE__PROT": "1"}, "unknown key node.prot"),
        ({"THIGHNODE_BOGUS__X": "1"}, "unknown section 'bogus'"),
        ({"THIGHNODE_SECURITY__ALLOWED_PEERS": '["10.0.0.300"]'}, "allowed_peers[0] = '10.0.0.300'"),
        ({"THIGHNODE_MODEL__DEVICE": "tpu"}, "model.device = 'tpu': allowed auto, cpu, cuda, cuda:N"),
        ({"THIGHNODE_MODEL__MIRROR": "yes"}, "model.mirror = 'yes': allowed bundle, on, off"),
        ({"THIGHNODE_MODEL__PRECISION": "fp16"}, "model.precision = 'fp16': allowed bundle, fp32, bf16"),
        ({"THIGHNODE_OUTPUTS__BINARY_COMPRESSION": "zip"}, "outputs.binary_compression = 'zip': allowed deflate, JPEG2000, none"),
        ({"THIGHNODE_DESTINATIONS": '[{name = "p", host = "h", port = 1}]'}, "lacks the key 'ae_title'"),
        ({"THIGHNODE_PROCESSING__ACCEPT_REGIONS": '["hip", "abdomen"]'},
         "processing.accept_regions[1] = 'abdomen': allowed pelvis, hip, thigh, knee, below_knee"),
        ({"THIGHNODE_PROCESSING__ACCEPT_REGIONS": "[]"}, "processing.accept_regions = []: must be a non-empty list"),
        ({"THIGHNODE_PROCESSING__ACCEPT_REGIONS": '["hip", "hip"]'}, "a region may be listed once"),
        ({"THIGHNODE_PROCESSING__MIN_REGION_MM": "0"}, "processing.min_region_mm = 0.0: allowed > 0.0 and <= 1000.0"),
        ({"THIGHNODE_PRIOR__METAL_WITHHOLD_NEAR_PCT": "0"}, "prior.metal_withhold_near_pct = 0.0: allowed > 0.0 and <= 100.0"),
        ({"THIGHNODE_PRIOR__METAL_WITHHOLD_NEAR_PCT": "150"}, "prior.metal_withhold_near_pct = 150.0: allowed > 0.0"),
        ({"THIGHNODE_PRIOR__METAL_WITHHOLD_SLICES_PCT": "-1"}, "prior.metal_withhold_slices_pct = -1.0: allowed > 0.0"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert fragment in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_model_mirror_follows_the_bundle_unless_set(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.model.mirror == "bundle" and s.model.mirror_override is None
    on = load_settings(environ={"THIGHNODE_HOME": str(tmp_path), "THIGHNODE_MODEL__MIRROR": "on"})
    off = load_settings(environ={"THIGHNODE_HOME": str(tmp_path), "THIGHNODE_MODEL__MIRROR": "off"})
    assert (on.model.mirror_override, off.model.mirror_override) == (True, False)


def test_model_precision_follows_the_bundle_unless_set(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.model.precision == "bundle"
    for value in ("fp32", "bf16"):
        set_ = load_settings(environ={"THIGHNODE_HOME": str(tmp_path), "THIGHNODE_MODEL__PRECISION": value})
        assert set_.model.precision == value


def test_outputs_enabled_defaults_to_seg_sr_pdf_and_takes_import_paths(tmp_path: Path) -> None:
    assert load_settings(environ={"THIGHNODE_HOME": str(tmp_path)}).outputs.enabled == ("seg", "sr", "pdf")
    s = load_settings(environ={"THIGHNODE_OUTPUTS__ENABLED": '["sr", "site_outputs.note:NoteOutput"]'})
    assert s.outputs.enabled == ("sr", "site_outputs.note:NoteOutput")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"seg"', r"outputs.enabled = 'seg': must be a list of outputs"),
        ('["seg", "xml"]', r"outputs.enabled\[1\] = 'xml': allowed: seg, sr, pdf or an import path 'package.module:Name'"),
        ('["seg", 3]', r"outputs.enabled\[1\] = 3: must be a string"),
        ('["seg", "seg"]', r"outputs.enabled = \['seg', 'seg'\]: an output may be listed once"),
    ],
)
def test_outputs_enabled_is_validated(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={"THIGHNODE_OUTPUTS__ENABLED": value})


def test_the_replaced_send_keys_say_what_to_write_instead(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[outputs]\nsend_pdf = false\n")
    with pytest.raises(ConfigError, match=r'outputs.send_pdf = False: replaced by outputs.enabled .* '
                                          r'write outputs.enabled = \["seg", "sr"\]'):
        load_settings(cfg, environ={})


def test_the_production_example_loads(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    s = load_settings(root / "deploy" / "node.production.toml", environ={})
    assert s.outputs.enabled == ("seg", "sr", "pdf")
    assert [d.name for d in s.destinations] == ["pacs"]


def test_audit_and_metrics_defaults_and_overrides(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.audit.enabled is True
    assert s.audit.file == tmp_path / "var" / "audit" / "audit.log"  # relative to the data directory
    assert (s.audit.syslog_host, s.audit.syslog_port, s.audit.syslog_protocol) == ("", 514, "udp")
    assert (s.metrics.enabled, s.metrics.host, s.metrics.port) == (False, "127.0.0.1", 9464)
    s = load_settings(environ={
        "THIGHNODE_HOME": str(tmp_path), "THIGHNODE_AUDIT__FILE": "/srv/audit/a.log",
        "THIGHNODE_AUDIT__SYSLOG_HOST": "arr.example", "THIGHNODE_AUDIT__SYSLOG_PROTOCOL": "tcp",
        "THIGHNODE_METRICS__ENABLED": "true", "THIGHNODE_METRICS__PORT": "0",
    })
    assert s.audit.file == Path("/srv/audit/a.log")
    assert (s.audit.syslog_host, s.audit.syslog_protocol) == ("arr.example", "tcp")
    assert s.metrics.enabled is True and s.metrics.port == 0


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"THIGHNODE_AUDIT__SYSLOG_PROTOCOL": "tls"}, "audit.syslog_protocol = 'tls': allowed udp, tcp"),
        ({"THIGHNODE_AUDIT__SYSLOG_PORT": "0"}, "audit.syslog_port = 0: allowed 1..65535"),
        ({"THIGHNODE_AUDIT__SYSLOG_HOST": '"two words"'}, "audit.syslog_host = 'two words': must be an IP address"),
        ({"THIGHNODE_AUDIT__ENABLED": "yes"}, "audit.enabled = 'yes': must be true or false"),
        ({"THIGHNODE_AUDIT__MAX_FILE_MB": "0"}, "audit.max_file_mb = 0.0: allowed > 0.0"),
        ({"THIGHNODE_METRICS__PORT": "70000"}, "metrics.port = 70000: allowed 0..65535"),
        ({"THIGHNODE_METRICS__HOST": '""'}, "metrics.host = '': must be an IP address or host name"),
    ],
)
def test_audit_and_metrics_values_are_validated(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert fragment in str(err.value)
def test_integrity_and_operations_settings_defaults_and_checks(tmp_path: Path) -> None:
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.outbox.max_attempts == 0  # retried by age, not by count (issue 25)
    assert s.processing.max_job_attempts == 3
    assert (s.security.max_element_bytes, s.security.max_instance_bytes) == (16 * 1024 * 1024, 2 * 1024**3)
    from thighnode.node import ingress_config_of
    from thighnode.stores import retry_policy_of

    assert ingress_config_of(s).integrity_limits.max_element_bytes == 16 * 1024 * 1024
    assert retry_policy_of(s).max_attempts == 0
    for env, fragment in (
        ({"THIGHNODE_OUTBOX__MAX_ATTEMPTS": "-1"}, "outbox.max_attempts = -1: allowed >= 0"),
        ({"THIGHNODE_PROCESSING__MAX_JOB_ATTEMPTS": "0"}, "processing.max_job_attempts = 0: allowed 1..100"),
        ({"THIGHNODE_SECURITY__MAX_ELEMENT_BYTES": "-5"}, "security.max_element_bytes = -5: allowed >= 0"),
        ({"THIGHNODE_SECURITY__MAX_INSTANCE_BYTES": '"big"'}, "security.max_instance_bytes = 'big': must be an integer"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(environ={"THIGHNODE_HOME": str(tmp_path), **env})
        assert fragment in str(info.value)


def test_storage_database_is_the_sqlite_file_by_default_or_a_postgresql_url(tmp_path: Path) -> None:
    from scp.db import PostgresUrl

    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    assert s.storage.database == "" and s.database == tmp_path / "var" / "thighnode.db"
    url = "postgresql://node:s3cret@db.example:5432/thighnode"
    s = load_settings(environ={"THIGHNODE_HOME": str(tmp_path), "THIGHNODE_STORAGE__DATABASE": url})
    assert s.database == PostgresUrl(url)
    assert "s3cret" not in repr(s) and "db.example:5432/thighnode" in repr(s.storage)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("mysql://node:s3cret@db/thighnode", "storage.database = 'mysql://...': allowed \"\""),
        ("postgresql://node:s3cret@db:99999/thighnode", "storage.database: PostgreSQL URL of"),
        ("postgresql://node:s3cret@db:5432/", "the URL names no database"),
        ("postgresql://node:s3cret@db/thigh node", "white space"),
    ],
)
def test_a_bad_storage_database_is_refused_without_showing_the_password(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"THIGHNODE_STORAGE__DATABASE": value})
    assert fragment in info.value.message and "s3cret" not in info.value.message
