"""The one way the node's stores open their database: a SQLite file (the default) or PostgreSQL.

Every store (the instance index here; jobs, results, priors, the outbox) keeps its own
tables in the same database and opens it with :func:`open_db`, so they all agree on the
journal (WAL, required, for SQLite), the busy timeout and the row type. The target is a
:class:`~pathlib.Path` (SQLite, the default: nothing to install, every process on one host)
or a :class:`PostgresUrl` (``postgresql://user@host:port/dbname``, :mod:`scp.db_postgres`:
processes on several hosts, e.g. Celery workers). The stores write their SQL once, in
SQLite's dialect; the PostgreSQL connection translates the few differences, and a store
branches on ``conn.dialect`` only where no translation fits (a SQLite-only migration).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union
from urllib.parse import parse_qs, unquote, urlsplit

from scp.errors import DatabaseError, IngressError

if TYPE_CHECKING:
    from scp.db_postgres import PostgresConnection

#: How long a connection waits for another connection's write lock on the file (s).
BUSY_TIMEOUT_S = 30.0

Synchronous = Literal["FULL", "NORMAL"]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class PostgresUrl:
    """A libpq connection URL. ``str()`` and ``repr()`` give host:port/dbname only (never the password),
    so the target can be logged; libpq reads a password left out of the URL from ``PGPASSWORD`` or
    ``~/.pgpass``."""

    url: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(POSTGRES_SCHEMES):
            raise DatabaseError("a PostgreSQL URL must start with postgresql:// (or postgres://)")
        try:
            urlsplit(self.url).port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise DatabaseError(f"PostgreSQL URL of {self.describe()}: bad port ({exc})") from None

    def describe(self) -> str:
        """``host:port/dbname`` (a socket directory given as ``?host=`` stands for the host)."""
        parts = urlsplit(self.url)
        query = parse_qs(parts.query)
        host = unquote(parts.hostname or "") or query.get("host", [""])[0] or "localhost"
        try:
            port = parts.port or int(query.get("port", ["5432"])[0])
        except ValueError:
            port = "?"  # type: ignore[assignment]
        dbname = unquote(parts.path.lstrip("/")) or query.get("dbname", ["(default)"])[0]
        return f"{host}:{port}/{dbname}"

    def __str__(self) -> str:
        return f"postgresql {self.describe()}"

    def __repr__(self) -> str:
        return f"PostgresUrl({self.describe()!r})"


DbTarget = Union[Path, PostgresUrl]


def db_target(value: Path | str | PostgresUrl) -> DbTarget:
    """A store's ``db_path`` argument as a target: a ``postgresql://`` string becomes a :class:`PostgresUrl`,
    anything else a path to the SQLite file."""
    if isinstance(value, PostgresUrl):
        return value
    if isinstance(value, str) and value.startswith(POSTGRES_SCHEMES):
        return PostgresUrl(value)
    return Path(value)


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, naming its dialect like :class:`scp.db_postgres.PostgresConnection`."""

    dialect: ClassVar[str] = SQLITE


Connection = Union[SqliteConnection, "PostgresConnection"]
Row = Any  # sqlite3.Row, or scp.db_postgres.PostgresRow: both take row["column"] and row[0]


def open_db(
    db_path: Path | str | PostgresUrl,
    schema: str = "",
    *,
    synchronous: Synchronous = "FULL",
    autocommit: bool = True,
    postgres_extra: str = "",
) -> Connection:
    """A connection to the database ``db_path`` (a SQLite file in WAL mode, or a PostgreSQL URL).

    ``autocommit=True``: no implicit transactions (the caller issues BEGIN / COMMIT);
    ``False``: implicit transactions, committed or rolled back by ``with conn:``.
    ``synchronous`` is SQLite's PRAGMA synchronous (NORMAL saves the WAL fsync on commit;
    only for data that can be rebuilt); on PostgreSQL NORMAL turns ``synchronous_commit`` off. ``schema`` (CREATE ... IF NOT
    EXISTS statements) is applied in one writer transaction (``postgres_extra`` after it, on
    PostgreSQL only). The connection may be used from any thread behind the caller's lock.
    Raises :class:`~scp.errors.DatabaseError` when the SQLite file cannot be put in WAL mode
    or the PostgreSQL server cannot be reached.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise IngressError(f"synchronous = {synchronous!r}: allowed FULL, NORMAL")
    target = db_target(db_path)
    if isinstance(target, PostgresUrl):
        from scp.db_postgres import open_postgres

        return open_postgres(target, schema + postgres_extra, autocommit=autocommit, synchronous=synchronous)
    return _open_sqlite(target, schema, synchronous, autocommit)


def _open_sqlite(db_path: Path, schema: str, synchronous: Synchronous, autocommit: bool) -> SqliteConnection:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        db_path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None if autocommit else "",
        factory=SqliteConnection,
    )
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DatabaseError(
                f"SQLite journal_mode of {db_path} is {mode!r} after asking for WAL; "
                "the node's stores need WAL (a local file system with shared-memory support)"
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        if schema:
            conn.executescript(f"BEGIN IMMEDIATE;{schema}COMMIT;")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteStore:
    """Base of a store that keeps its tables in the node's database: one connection
    (from :func:`open_db`, autocommit) behind a re-entrant lock, so an instance may be
    shared by threads. A subclass names its tables in ``SCHEMA`` (SQLite's dialect)."""

    SCHEMA: ClassVar[str] = ""

    def __init__(self, db_path: Path | str | PostgresUrl) -> None:
        self._lock = threading.RLock()
        self._db = open_db(db_path, self.SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
