"""The ``[audit]`` and ``[metrics]`` sections of the node's settings (thighnode.settings reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AuditSettings:
    """The DICOM audit trail (thighnode.audit): PHI-bearing, apart from the application log."""

    enabled: bool = True
    file: Path = Path("var/audit/audit.log")  # resolved against data_dir when relative
    max_file_mb: float = 50.0  # rotated past this size
    keep_files: int = 10  # rotated files kept (audit.log.1 ...)
    syslog_host: str = ""  # "" = no syslog
    syslog_port: int = 514
    syslog_protocol: str = "udp"  # udp (RFC 5426) | tcp (RFC 6587 octet counting)


@dataclass(frozen=True)
class MetricsSettings:
    """The health and metrics HTTP endpoint (thighnode.metrics)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464  # 0: any free port (tests)


def monitoring_sections(values: dict[str, dict[str, Any]], data_dir: Path) -> dict[str, Any]:
    """``[audit]`` (its file resolved against the data directory) and ``[metrics]``, as Settings fields."""
    from thighnode.settings import ConfigError  # here: settings imports this module

    audit = values["audit"]
    host = audit["syslog_host"]
    if host and any(ch.isspace() for ch in host):
        raise ConfigError(f"audit.syslog_host = {host!r}: must be an IP address or host name, or \"\" (no syslog)")
    return {
        "audit": AuditSettings(**{**audit, "file": _resolve(data_dir, audit["file"])}),
        "metrics": MetricsSettings(**values["metrics"]),
    }


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
