"""Node configuration: one TOML file plus ``THIGHNODE_*`` environment overrides.

The defaults live in ``config/node.toml``. A file given with ``--config`` is read
*over* those defaults (keys it leaves out keep their default). Then environment
variables ``THIGHNODE_<SECTION>__<KEY>`` override single keys; their value is
parsed as a TOML value (``11113``, ``true``, ``["CT1", "PACS"]``) and taken as
a plain string when it is not valid TOML. ``THIGHNODE_DESTINATIONS`` takes a TOML
array of inline tables.

Everything is validated once, at start, and each message names the key, the value
seen and what is allowed.

Relative paths (``node.data_dir``, ``model.bundle``) are resolved against
``THIGHNODE_HOME`` when set, else the current working directory; a relative
bundle path that does not exist there is also looked up in the install root
(where the demonstration bundle ships).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dicomout.outputs.registry import entry_problem
from node_errors import NodeError
from pipeline.coverage import REGIONS
from scp.db import PostgresUrl
from scp.errors import TlsConfigError
from scp.tls import TlsConfig
from scp.validate import validate_ae_title
from thighnode.settings_monitoring import AuditSettings, MetricsSettings, monitoring_sections
from thighnode.settings_storage import StorageSettings, database_url

INSTALL_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = INSTALL_ROOT / "config" / "node.toml"
ENV_PREFIX = "THIGHNODE_"


class ConfigError(NodeError):
    """The configuration is invalid; the message names key, value and what is allowed."""


# ---------------------------------------------------------------------------
# Validators: each returns the normalised value or raises ConfigError.


def _ae_title(key: str, value: Any) -> str:
    """An AE title (PS3.5 6.2, VR AE), checked by the node's one AE-title rule (scp.validate)."""
    return validate_ae_title(value, key, ConfigError)


def _int_range(lo: int, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: must be an integer")
        if value < lo or (hi is not None and value > hi):
            allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{key} = {value!r}: allowed {allowed}")
        return value

    return check


def _float_range(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        value = float(value)
        too_low = value <= lo if lo_open else value < lo
        if too_low or (hi is not None and value > hi):
            low = f"> {lo}" if lo_open else f">= {lo}"
            allowed = f"{low} and <= {hi}" if hi is not None else low
            raise ConfigError(f"{key} = {value!r}: allowed {allowed}")
        return value

    return check


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} = {value!r}: must be a non-empty string")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: must be a string")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key} = {value!r}: allowed {', '.join(choices)}")
        return value

    return check


def _device(key: str, value: Any) -> str:
    if not isinstance(value, str) or not (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        raise ConfigError(f"{key} = {value!r}: allowed auto, cpu, cuda, cuda:N")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: must be true or false")
    return value


def _host(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
        raise ConfigError(f"{key} = {value!r}: must be an IP address or host name")
    return value


def _ae_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} = {value!r}: must be a list of AE titles, e.g. [\"CT1\", \"PACS\"]")
    return tuple(_ae_title(f"{key}[{i}]", v) for i, v in enumerate(value))


def _region_list(key: str, value: Any) -> tuple[str, ...]:
    """A non-empty list of body regions (pipeline.coverage.REGIONS), each once."""
    allowed = ", ".join(REGIONS)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} = {value!r}: must be a non-empty list of regions among {allowed}")
    for i, v in enumerate(value):
        if v not in REGIONS:
            raise ConfigError(f"{key}[{i}] = {v!r}: allowed {allowed}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} = {value!r}: a region may be listed once")
    return tuple(value)


def _network_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} = {value!r}: must be a list of addresses or networks, e.g. [\"10.0.0.0/8\"]")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(str(ipaddress.ip_network(str(v), strict=False)))
        except ValueError:
            raise ConfigError(
                f"{key}[{i}] = {v!r}: must be an IPv4/IPv6 address or network in CIDR form (e.g. 192.168.1.0/24)"
            ) from None
    return tuple(out)


def _output_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key} = {value!r}: must be a list of outputs, e.g. [\"seg\", \"sr\", \"pdf\"]")
    for i, entry in enumerate(value):
        problem = entry_problem(entry)
        if problem:
            raise ConfigError(f"{key}[{i}] = {entry!r}: {problem}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} = {value!r}: an output may be listed once")
    return tuple(value)


def _broker_url(key: str, value: Any) -> str:
    """An AMQP URL (amqp:// or amqps://) of the RabbitMQ broker."""
    if not isinstance(value, str) or not value.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"{key} = {value!r}: allowed an AMQP URL, amqp://user:password@host:5672/vhost or amqps://...")
    return value


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} = {value!r}: must be a path (string)")
    return value


# section -> key -> validator
_SCHEMA: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "node": {
        "ae_title": _ae_title,
        "host": _host,
        "port": _int_range(1, 65535),
        "data_dir": _path,
        "quiet_period_s": _float_range(0.0),
        "max_associations": _int_range(1, 1000),
        "max_pdu_bytes": _int_range(0, 2**32 - 1),
        "acse_timeout_s": _float_range(0.0, lo_open=True),
        "dimse_timeout_s": _float_range(0.0, lo_open=True),
        "network_timeout_s": _float_range(0.0, lo_open=True),
        "min_free_disk_mb": _int_range(0),
        "log_level": _choice("DEBUG", "INFO", "WARNING", "ERROR"),
    },
    "retention": {
        "keep_received_days": _float_range(0.0),
        "keep_outputs_days": _float_range(0.0),
    },
    "processing": {
        "max_slice_thickness_mm": _float_range(0.0, lo_open=True),
        "min_slices": _int_range(2),
        "workers": _int_range(1, 16),
        "job_timeout_s": _float_range(0.0, lo_open=True),
        "accept_regions": _region_list,
        "min_region_mm": _float_range(0.0, 1000.0, lo_open=True),
        "max_job_attempts": _int_range(1, 100),
    },
    "storage": {"database": database_url},
    "compute": {
        "backend": _choice("local", "celery"),
        "broker_url": _broker_url,
        "queue": _string,
        "debug_task_delay_s": _float_range(0.0, 3600.0),
    },
    "model": {
        "bundle": _path,
        "device": _device,
        "sw_batch_size": _int_range(1, 256),
        "overlap": _float_range(0.0, 0.95),
        "mirror": _choice("bundle", "on", "off"),
        "precision": _choice("bundle", "fp32", "bf16"),
        "uncertainty": _choice("off", "tta"),
        "uncertainty_samples": _int_range(2, 4),
    },
    "outputs": {
        "seg_type": _choice("BINARY", "LABELMAP"),
        "labelmap_compression": _choice("RLE", "JPEGLS", "JPEG2000", "deflate", "none"),
        "binary_compression": _choice("deflate", "JPEG2000", "none"),
        "enabled": _output_list,
        "manufacturer": _string,
        "institution_name": _text,
        "device_serial": _string,
    },
    "outbox": {
        "send_interval_s": _float_range(0.0, lo_open=True),
        "base_delay_s": _float_range(0.0),
        "max_delay_s": _float_range(0.0),
        "max_attempts": _int_range(0),
        "max_age_days": _float_range(0.0, lo_open=True),
    },
    "prior": {
        "query": _bool,
        "ae_title": _ae_title,
        "host": _host,
        "port": _int_range(1, 65535),
        "method": _choice("move", "get"),
        "send_prior_results": _bool, "update_when_prior_arrives": _bool,
        "retrieve_attempts": _int_range(1, 100),
        "retry_delay_s": _float_range(0.0, lo_open=True),
        "metal_withhold_near_pct": _float_range(0.0, 100.0, lo_open=True),
        "metal_withhold_slices_pct": _float_range(0.0, 100.0, lo_open=True),
        "withhold_partial": _bool, "tls": _bool,
    },
    "sarcopenia": {
        "group": _choice("gluteal", "above_knee", "all"),
        "threshold_female_kg_m2": _float_range(0.0, 50.0, lo_open=True),
        "threshold_male_kg_m2": _float_range(0.0, 50.0, lo_open=True),
        "calibrated_for_ct": _bool,
        "source": _string,
    },
    "security": {
        "allowed_calling_aets": _ae_list,
        "allowed_peers": _network_list,
        "associate_timeout_s": _float_range(0.0, 600.0, lo_open=True),
        "max_connections_per_peer": _int_range(1, 1000),
        "plain_port_enabled": _bool,
        "tls_port": _int_range(0, 65535),
        "tls_certificate": _text,
        "tls_private_key": _text,
        "tls_ca_certificates": _text,
        "tls_require_client_certificate": _bool,
        "max_element_bytes": _int_range(0),
        "max_instance_bytes": _int_range(0),
    },
    "audit": {
        "enabled": _bool,
        "file": _path,
        "max_file_mb": _float_range(0.0, lo_open=True),
        "keep_files": _int_range(0, 1000),
        "syslog_host": _text,
        "syslog_port": _int_range(1, 65535),
        "syslog_protocol": _choice("udp", "tcp"),
    },
    "metrics": {
        "enabled": _bool,
        "host": _host,
        "port": _int_range(0, 65535),
    },
}

_DESTINATION_SCHEMA: dict[str, Callable[[str, Any], Any]] = {
    "name": _string,
    "ae_title": _ae_title,
    "host": _host,
    "port": _int_range(1, 65535),
}
#: Keys a [[destinations]] table may leave out, with their default.
_DESTINATION_OPTIONAL: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "tls": (_bool, False),
}


# ---------------------------------------------------------------------------
# The settings objects.


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str
    host: str
    port: int
    data_dir: Path
    quiet_period_s: float
    max_associations: int
    max_pdu_bytes: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    min_free_disk_mb: int
    log_level: str


@dataclass(frozen=True)
class RetentionSettings:
    keep_received_days: float
    keep_outputs_days: float


@dataclass(frozen=True)
class ProcessingSettings:
    max_slice_thickness_mm: float
    min_slices: int
    workers: int
    job_timeout_s: float
    accept_regions: tuple[str, ...]  # a series is processed when it shows one of these (pipeline.coverage)
    min_region_mm: float  # ... over at least this much of z
    max_job_attempts: int = 3  # a job started this many times without finishing (the node died) is failed


@dataclass(frozen=True)
class ComputeSettings:
    backend: str  # "local": in-process worker threads; "celery": tasks on a RabbitMQ broker (thighnode.compute)
    broker_url: str
    queue: str
    debug_task_delay_s: float  # tests only: a Celery task sleeps this long before its job


@dataclass(frozen=True)
class ModelSettings:
    bundle: Path
    device: str
    sw_batch_size: int
    overlap: float
    mirror: str  # "bundle" (the bundle's sliding_window.mirror), "on" or "off"
    uncertainty: str = "off"  # "off" or "tta": per-structure uncertainty from test-time augmentation
    uncertainty_samples: int = 2  # 2..4 augmentations (identity, mirror, shift, mirror + shift)
    precision: str = "bundle"  # "bundle" (the bundle's sliding_window.precision), "fp32" or "bf16"

    @property
    def mirror_override(self) -> bool | None:
        """Segmenter(mirror=...): None follows the bundle."""
        return {"bundle": None, "on": True, "off": False}[self.mirror]


@dataclass(frozen=True)
class OutputsSettings:
    seg_type: str
    labelmap_compression: str
    binary_compression: str
    enabled: tuple[str, ...]  # the outputs sent, in order: built-in names or "package.module:Name"
    manufacturer: str
    institution_name: str
    device_serial: str


@dataclass(frozen=True)
class OutboxSettings:
    send_interval_s: float
    base_delay_s: float
    max_delay_s: float
    max_attempts: int
    max_age_days: float


@dataclass(frozen=True)
class PriorSettings:
    query: bool
    ae_title: str
    host: str
    port: int
    method: str
    send_prior_results: bool
    update_when_prior_arrives: bool
    retrieve_attempts: int
    retry_delay_s: float
    metal_withhold_near_pct: float = 7.0  # pipeline.compare: volume change withheld from this share near metal
    metal_withhold_slices_pct: float = 1.0  # ... and from this share in slices holding metal (streaks)
    withhold_partial: bool = True  # pipeline.compare: a structure cut by either scan's field of view: change withheld
    tls: bool = False  # query/retrieve over DICOM TLS with [security]'s certificate and trust store


@dataclass(frozen=True)
class SarcopeniaSettings:
    group: str
    threshold_female_kg_m2: float
    threshold_male_kg_m2: float
    calibrated_for_ct: bool
    source: str


@dataclass(frozen=True)
class SecuritySettings:
    allowed_calling_aets: tuple[str, ...]
    allowed_peers: tuple[str, ...]
    max_element_bytes: int = 16 * 1024 * 1024  # any element but Pixel Data (scp.integrity); 0 = no limit
    max_instance_bytes: int = 2 * 1024 * 1024 * 1024  # one C-STORE's dataset; 0 = no limit
    associate_timeout_s: float = 5.0  # TCP accept to complete A-ASSOCIATE-RQ (TLS handshake included)
    max_connections_per_peer: int = 8
    plain_port_enabled: bool = True  # node.port serves plain DICOM
    tls_port: int = 0  # 0: no TLS listener
    tls_certificate: Path | None = None  # resolved paths; None when not configured
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool = False

    @property
    def tls(self) -> TlsConfig | None:
        """The node's TLS identity and trust store (files checked to exist), None without a certificate."""
        if self.tls_certificate is None or self.tls_private_key is None:
            return None
        try:
            return TlsConfig(
                certificate=self.tls_certificate,
                private_key=self.tls_private_key,
                ca_certificates=self.tls_ca_certificates,
                require_client_certificate=self.tls_require_client_certificate,
            )
        except TlsConfigError as exc:
            raise ConfigError(f"[security] {exc}") from None


@dataclass(frozen=True)
class DestinationSettings:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False  # C-STORE over DICOM TLS with [security]'s certificate and trust store


@dataclass(frozen=True)
class Settings:
    node: NodeSettings
    retention: RetentionSettings
    processing: ProcessingSettings
    model: ModelSettings
    outputs: OutputsSettings
    outbox: OutboxSettings
    prior: PriorSettings
    sarcopenia: SarcopeniaSettings
    security: SecuritySettings
    compute: ComputeSettings
    destinations: tuple[DestinationSettings, ...] = ()
    sources: tuple[str, ...] = field(default=(), compare=False)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def db_path(self) -> Path:
        return self.node.data_dir / "thighnode.db"

    @property
    def database(self) -> Path | PostgresUrl:
        """What the stores open: the SQLite file :attr:`db_path`, or ``[storage] database`` (PostgreSQL)."""
        return self.storage.target(self.node.data_dir)

    @property
    def outputs_dir(self) -> Path:
        return self.node.data_dir / "outputs"

    def destination(self, name: str) -> DestinationSettings:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"destination {name!r} is not configured; configured: {known}")


# ---------------------------------------------------------------------------
# Loading.


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any], source: str) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, value in over.items():
        if section == "destinations":
            merged["destinations"] = value
            continue
        if section not in _SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed: {', '.join([*_SCHEMA, 'destinations'])}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        merged.setdefault(section, {}).update(value)
    return merged


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}HOME":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest == "destinations":
            out["destinations"] = _parse_env_value(raw)
            continue
        if "__" not in rest:
            raise ConfigError(
                f"environment variable {name}: expected THIGHNODE_<SECTION>__<KEY>, e.g. THIGHNODE_NODE__PORT"
            )
        section, key = rest.split("__", 1)
        if section not in _SCHEMA:
            raise ConfigError(f"environment variable {name}: unknown section {section!r}; allowed: {', '.join(_SCHEMA)}")
        out.setdefault(section, {})[key] = _parse_env_value(raw)
    return out


_REPLACED_SEND_KEYS = {"send_seg": "seg", "send_sr": "sr", "send_pdf": "pdf"}


def _refuse_replaced_keys(outputs: dict[str, Any]) -> None:
    """outputs.send_seg/send_sr/send_pdf were replaced by outputs.enabled: say what to write instead."""
    old = [k for k in _REPLACED_SEND_KEYS if k in outputs]
    if not old:
        return
    enabled = [name for key, name in _REPLACED_SEND_KEYS.items() if outputs.get(key, True) is not False]
    raise ConfigError(
        f"outputs.{old[0]} = {outputs[old[0]]!r}: replaced by outputs.enabled (the outputs sent); "
        f"remove outputs.{', outputs.'.join(old)} and write outputs.enabled = {json.dumps(enabled)}"
    )


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _destinations(raw_dests: Any) -> tuple[DestinationSettings, ...]:
    """The [[destinations]] tables, validated (names unique)."""
    destinations = []
    if not isinstance(raw_dests, list):
        raise ConfigError(f"destinations = {raw_dests!r}: must be an array of tables ([[destinations]])")
    for i, dest in enumerate(raw_dests):
        if not isinstance(dest, dict):
            raise ConfigError(f"destinations[{i}] = {dest!r}: must be a table with name, ae_title, host, port")
        unknown = sorted(set(dest) - set(_DESTINATION_SCHEMA) - set(_DESTINATION_OPTIONAL))
        if unknown:
            raise ConfigError(
                f"unknown key destinations[{i}].{unknown[0]}; allowed: "
                f"{', '.join([*_DESTINATION_SCHEMA, *_DESTINATION_OPTIONAL])}"
            )
        missing = [k for k in _DESTINATION_SCHEMA if k not in dest]
        if missing:
            raise ConfigError(f"destinations[{i}] lacks the key {missing[0]!r} (name, ae_title, host, port are required)")
        fields = {k: check(f"destinations[{i}].{k}", dest[k]) for k, check in _DESTINATION_SCHEMA.items()}
        for k, (check, default) in _DESTINATION_OPTIONAL.items():
            fields[k] = check(f"destinations[{i}].{k}", dest[k]) if k in dest else default
        destinations.append(DestinationSettings(**fields))
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"destinations: names must be unique; saw {names}")
    return tuple(destinations)


def _security(values: dict[str, Any], base: Path) -> SecuritySettings:
    """[security] with TLS paths resolved and the TLS keys checked against each other."""
    sec = dict(values)
    for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
        sec[key] = _resolve(base, sec[key]) if sec[key] else None
    if sec["tls_port"]:
        if sec["tls_certificate"] is None or sec["tls_private_key"] is None:
            raise ConfigError(
                f"security.tls_port = {sec['tls_port']}: needs security.tls_certificate and security.tls_private_key"
            )
    if sec["tls_require_client_certificate"] and sec["tls_ca_certificates"] is None:
        raise ConfigError(
            "security.tls_require_client_certificate = true: needs security.tls_ca_certificates "
            "(the CAs that issue the client certificates)"
        )
    if not sec["plain_port_enabled"] and not sec["tls_port"]:
        raise ConfigError("security.plain_port_enabled = false with security.tls_port = 0: the node would not listen")
    settings = SecuritySettings(**sec)
    _ = settings.tls  # the files exist (ConfigError naming the file otherwise)
    return settings


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the defaults, then ``path`` (if given), then environment overrides; validate."""
    environ = os.environ if environ is None else environ
    sources = [str(DEFAULT_CONFIG_PATH)]
    data = _read_toml(DEFAULT_CONFIG_PATH)
    if path is not None:
        path = Path(path)
        data = _merge(data, _read_toml(path), str(path))
        sources.append(str(path))
    env = _env_overrides(environ)
    if env:
        data = _merge(data, env, "environment")
        sources.append("environment")

    _refuse_replaced_keys(data.get("outputs", {}))
    values: dict[str, dict[str, Any]] = {}
    for section, schema in _SCHEMA.items():
        given = data.get(section, {})
        unknown = sorted(set(given) - set(schema))
        if unknown:
            raise ConfigError(
                f"unknown key {section}.{unknown[0]}; allowed keys in [{section}]: {', '.join(schema)}"
            )
        missing = [k for k in schema if k not in given]
        if missing:
            raise ConfigError(f"missing key {section}.{missing[0]} (no default found in {DEFAULT_CONFIG_PATH})")
        values[section] = {k: check(f"{section}.{k}", given[k]) for k, check in schema.items()}

    destinations = _destinations(data.get("destinations", []))

    base = Path(environ.get(f"{ENV_PREFIX}HOME") or os.getcwd())
    node = dict(values["node"])
    node["data_dir"] = _resolve(base, node["data_dir"])
    model = dict(values["model"])
    bundle = _resolve(base, model["bundle"])
    if not bundle.exists() and not Path(model["bundle"]).is_absolute():
        bundle = INSTALL_ROOT / model["bundle"]
    model["bundle"] = bundle
    if values["outbox"]["max_delay_s"] < values["outbox"]["base_delay_s"]:
        raise ConfigError(
            f"outbox.max_delay_s = {values['outbox']['max_delay_s']}: must be >= outbox.base_delay_s "
            f"({values['outbox']['base_delay_s']})"
        )

    security = _security(values["security"], base)
    if security.plain_port_enabled and security.tls_port == node["port"]:
        raise ConfigError(f"security.tls_port = {security.tls_port}: is node.port too; choose another port")
    needs_tls = [f"destinations[{i}] ({d.name})" for i, d in enumerate(destinations) if d.tls]
    if values["prior"]["tls"]:
        needs_tls.append("prior")
    if needs_tls and security.tls is None:
        raise ConfigError(
            f"{', '.join(needs_tls)}: tls = true needs security.tls_certificate and security.tls_private_key "
            "(the node's certificate, presented to the peer)"
        )

    return Settings(
        node=NodeSettings(**node),
        retention=RetentionSettings(**values["retention"]),
        processing=ProcessingSettings(**values["processing"]),
        model=ModelSettings(**model),
        outputs=OutputsSettings(**values["outputs"]),
        outbox=OutboxSettings(**values["outbox"]),
        prior=PriorSettings(**values["prior"]),
        sarcopenia=SarcopeniaSettings(**values["sarcopenia"]),
        security=security, compute=ComputeSettings(**values["compute"]),
        destinations=tuple(destinations),
        sources=tuple(sources), **monitoring_sections(values, node["data_dir"]),
        storage=StorageSettings(**values["storage"]),
    )
