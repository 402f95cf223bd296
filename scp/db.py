"""The one way the node's stores open its SQLite file.

Every store (the instance index here; jobs, results, priors, the outbox) keeps its own
tables in the same file and opens it with :func:`open_db`, so they all agree on the
journal (WAL, required), the busy timeout and the row type.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import ClassVar, Literal

from scp.errors import IngressError

#: How long a connection waits for another connection's write lock on the file (s).
BUSY_TIMEOUT_S = 30.0

Synchronous = Literal["FULL", "NORMAL"]


def open_db(
    db_path: Path,
    schema: str = "",
    *,
    synchronous: Synchronous = "FULL",
    autocommit: bool = True,
) -> sqlite3.Connection:
    """A connection to ``db_path`` in WAL mode, rows as :class:`sqlite3.Row`.

    ``autocommit=True``: no implicit transactions (the caller issues BEGIN / COMMIT);
    ``False``: Python's implicit transactions, committed or rolled back by ``with conn:``.
    ``synchronous`` is the connection's PRAGMA synchronous (NORMAL saves the WAL fsync
    on commit; only for data that can be rebuilt). ``schema`` (CREATE ... IF NOT EXISTS
    statements) is applied in one IMMEDIATE transaction. The connection may be used
    from any thread behind the caller's lock. Raises :class:`~scp.errors.IngressError`
    when the file cannot be put in WAL mode.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise IngressError(f"synchronous = {synchronous!r}: allowed FULL, NORMAL")
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        db_path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None if autocommit else ""
    )
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise IngressError(
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
    """Base of a store that keeps its tables in the node's SQLite file: one connection
    (from :func:`open_db`, autocommit) behind a re-entrant lock, so an instance may be
    shared by threads. A subclass names its tables in ``SCHEMA``."""

    SCHEMA: ClassVar[str] = ""

    def __init__(self, db_path: Path) -> None:
        self._lock = threading.RLock()
        self._db = open_db(db_path, self.SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
