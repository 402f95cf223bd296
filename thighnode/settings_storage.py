"""The ``[storage]`` section of the node's settings (thighnode.settings reads it): where the stores live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scp.db import POSTGRES_SCHEMES, DbTarget, PostgresUrl
from scp.errors import DatabaseError

SQLITE_FILE = "thighnode.db"
"""The SQLite file in the data directory, when ``[storage] database`` is empty."""


@dataclass(frozen=True)
class StorageSettings:
    """``database``: "" = the SQLite file ``<data_dir>/thighnode.db`` (one host), or a PostgreSQL URL
    ``postgresql://user@host:port/dbname`` (node and Celery workers on several hosts)."""

    database: str = ""

    def __repr__(self) -> str:  # the URL may hold a password
        return f"StorageSettings(database={self.describe()!r})"

    def describe(self) -> str:
        return str(PostgresUrl(self.database)) if self.database else "sqlite (data directory)"

    def target(self, data_dir: Path) -> DbTarget:
        return PostgresUrl(self.database) if self.database else data_dir / SQLITE_FILE


def database_url(key: str, value: Any) -> str:
    """"" or a ``postgresql://`` URL with a host (or ``?host=`` socket directory) and a database name; the
    error never repeats a password."""
    from thighnode.settings import ConfigError  # here: settings imports this module

    if value == "":
        return ""
    if not isinstance(value, str) or not value.startswith(POSTGRES_SCHEMES):
        shown = value if not isinstance(value, str) else value.split("://", 1)[0] + "://..."
        raise ConfigError(f"{key} = {shown!r}: allowed \"\" (SQLite file in the data directory) or a PostgreSQL URL "
                          "postgresql://user@host:5432/dbname (password from PGPASSWORD or ~/.pgpass)")
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{key}: the PostgreSQL URL contains white space; allowed a URL without spaces")
    try:
        url = PostgresUrl(value)
    except DatabaseError as exc:
        raise ConfigError(f"{key}: {exc.message}") from None
    parts = urlsplit(value)
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise ConfigError(f"{key} = {url.describe()!r}: the URL names no database; allowed postgresql://user@host:5432/dbname")
    return value
