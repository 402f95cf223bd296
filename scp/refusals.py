"""Receive-time refusals: every C-STORE answered with a failure and every association
rejected, recorded in the node's SQLite file so that `thighnode status` shows them.

A row holds identifiers only (time, calling AE title, peer address, DIMSE status or
A-ASSOCIATE-RJ, the reason, the SOP Instance UID): never a patient's name, ID or birth
date. :meth:`RefusalLog.record` is the one place a refusal is recorded, so that an audit
trail (PS3.15 A.5) or a metrics counter can be attached there.

The table is ``receive_refusals``; this module creates and touches only it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from scp.db import Connection, PostgresUrl, open_db

LOGGER = logging.getLogger(__name__)

#: What was refused: one C-STORE, or a whole association (A-ASSOCIATE-RJ, PS3.8 9.3.4).
KIND_STORE = "c-store"
KIND_ASSOCIATION = "association"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receive_refusals (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    at               REAL NOT NULL,
    kind             TEXT NOT NULL,
    calling_ae       TEXT NOT NULL,
    peer_address     TEXT NOT NULL,
    status           INTEGER,
    reason           TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS receive_refusals_at ON receive_refusals (at);
"""


@dataclass(frozen=True)
class Refusal:
    """One refusal. ``status`` is the DIMSE status of a refused C-STORE, None for an association."""

    at: float
    kind: str
    calling_ae: str
    peer_address: str
    status: int | None
    reason: str
    sop_instance_uid: str = ""


class RefusalLog:
    """The ``receive_refusals`` table; thread-safe (one connection behind a lock)."""

    def __init__(self, db_path: Path | str | PostgresUrl, *, synchronous: str = "NORMAL") -> None:
        self._lock = threading.Lock()
        # NORMAL: a refusal lost to a power cut is a lost log line, not lost data.
        self._conn: Connection | None = open_db(db_path, _SCHEMA, synchronous=synchronous)  # type: ignore[arg-type]

    def record(self, refusal: Refusal) -> None:
        """Record one refusal. Never raises (a refusal must still be answered when the database fails)."""
        try:
            with self._lock:
                if self._conn is None:
                    return
                self._conn.execute(
                    "INSERT INTO receive_refusals (at, kind, calling_ae, peer_address, status, reason, "
                    "sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (refusal.at, refusal.kind, refusal.calling_ae, refusal.peer_address, refusal.status,
                     refusal.reason, refusal.sop_instance_uid),
                )
        except Exception as exc:  # noqa: BLE001 - the handler must answer even without its record
            LOGGER.error("could not record a refusal of %s from %s: %s", refusal.kind, refusal.calling_ae, exc)

    def recent(self, limit: int = 20) -> list[Refusal]:
        """The last ``limit`` refusals, newest first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT at, kind, calling_ae, peer_address, status, reason, sop_instance_uid FROM receive_refusals "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [Refusal(float(r[0]), r[1], r[2], r[3], None if r[4] is None else int(r[4]), r[5], r[6]) for r in rows]

    def counts(self, since: float | None = None) -> dict[str, int]:
        """Refusals per status ("0xC003", ..., "association"), in that order, since ``since`` (epoch s; None = all)."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT kind, status, COUNT(*) FROM receive_refusals WHERE at >= ? GROUP BY kind, status",
                (since if since is not None else float("-inf"),),
            ).fetchall()
        counts = {(KIND_ASSOCIATION if kind == KIND_ASSOCIATION else f"0x{int(status):04X}"): int(n)
                  for kind, status, n in rows}
        return dict(sorted(counts.items()))

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("the refusal log is closed")
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
