"""The one way thighnode's stores open the node's SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(db_path: Path, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (explicit BEGIN), WAL, synchronous=FULL, rows by name,
    usable from any thread behind the caller's lock; ``schema`` (CREATE ... IF NOT EXISTS) applied."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(db_path), timeout=30.0, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db
