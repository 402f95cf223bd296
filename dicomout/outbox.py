"""The persistent outbox: objects waiting to be C-STOREd to a destination.

State lives in the ``outbox`` table of the node's SQLite database (WAL journal; the
file is shared with other modules' tables, this module touches only its own).
An item is *pending* until it is stored (*sent*) or given up on (*failed*):
transient failures are retried with exponential backoff, permanent ones (the peer
refuses the SOP Class, the file is unreadable) fail at once. Because everything
is in SQLite, a crash loses nothing: a new :class:`Outbox` on the same file sees
the pending items and :func:`send_pending` resumes them.

Times are POSIX seconds (``time.time()``), stored as REAL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomout.errors import OutputError
from dicomout.sender import Destination
from scp.status import describe_status
from dicomout.transports import DEFAULT_TRANSPORTS, TRANSPORT_CSTORE, Transport
from scp.db import SQLITE, Connection, PostgresUrl, Row, db_target, open_db

LOGGER = logging.getLogger(__name__)

STATE_PENDING = "pending"
STATE_SENT = "sent"
STATE_FAILED = "failed"
STATES: tuple[str, ...] = (STATE_PENDING, STATE_SENT, STATE_FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    destination        TEXT    NOT NULL,
    path               TEXT    NOT NULL,
    sop_class_uid      TEXT    NOT NULL,
    sop_instance_uid   TEXT    NOT NULL,
    study_instance_uid TEXT    NOT NULL,
    job_id             INTEGER,
    state              TEXT    NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    generation         INTEGER NOT NULL DEFAULT 1,
    created_at         REAL    NOT NULL,
    next_attempt_at    REAL    NOT NULL,
    last_status        INTEGER,
    last_error         TEXT    NOT NULL DEFAULT '',
    sent_at            REAL,
    transport          TEXT    NOT NULL DEFAULT 'cstore',
    transfer_syntax_uid TEXT   NOT NULL DEFAULT '',
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_study ON outbox (study_instance_uid);
"""

_COLUMNS = (
    "id, destination, path, sop_class_uid, sop_instance_uid, study_instance_uid, job_id, state, "
    "attempts, generation, created_at, next_attempt_at, last_status, last_error, sent_at, transport, "
    "transfer_syntax_uid"
)


def _add_transport_column(conn: Connection) -> None:
    """Migrate a database made before items had a transport kind (they were all C-STORE) or recorded
    the transfer syntax they were sent in (unknown: empty)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "transport" not in columns:
        conn.execute(f"ALTER TABLE outbox ADD COLUMN transport TEXT NOT NULL DEFAULT '{TRANSPORT_CSTORE}'")
        LOGGER.info("outbox table migrated: column transport added (existing items: %s)", TRANSPORT_CSTORE)
    if "transfer_syntax_uid" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN transfer_syntax_uid TEXT NOT NULL DEFAULT ''")
        LOGGER.info("outbox table migrated: column transfer_syntax_uid added (existing items: unknown)")


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a transiently failed item and when to give up.

    The n-th failure (n = attempts after it, from 1) schedules the next attempt
    ``min(base_delay_s * 2**(n-1), max_delay_s)`` later: 10 s, 20 s, 40 s ... 1 h.
    An item fails for good once it has waited ``max_age_s`` since it was (re-)enqueued,
    or after ``max_attempts`` attempts when that is not 0 (0, the default: no count, the
    age alone ends delivery, so a long PACS outage does not lose results before
    ``max_age_s``). A failed item is sent again by :meth:`Outbox.resend`.
    """

    base_delay_s: float = 10.0
    max_delay_s: float = 3600.0
    max_attempts: int = 0
    max_age_s: float = 3 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("base_delay_s", "max_delay_s", "max_age_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise OutputError(f"RetryPolicy.{name} is {value!r} (allowed: a number > 0)")
        if self.max_delay_s < self.base_delay_s:
            raise OutputError(
                f"RetryPolicy.max_delay_s {self.max_delay_s!r} is below base_delay_s {self.base_delay_s!r} "
                "(allowed: max_delay_s >= base_delay_s)"
            )
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 0:
            raise OutputError(
                f"RetryPolicy.max_attempts is {self.max_attempts!r} (allowed: an integer >= 0; 0 = no limit)"
            )

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (attempts >= 1)."""
        exponent = max(attempts - 1, 0)
        if exponent > 60:  # 2**60 * base is far beyond any cap
            return self.max_delay_s
        return min(self.base_delay_s * 2**exponent, self.max_delay_s)


@dataclass(frozen=True)
class OutboxItem:
    """One object queued for one destination (a row of ``outbox``).

    ``generation`` grows each time the object is re-enqueued (reprocessing), so
    that the outcome of a send that raced with a re-enqueue is not recorded on
    the newer entry.
    """

    id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    job_id: int | None
    state: str
    attempts: int
    generation: int
    created_at: float
    next_attempt_at: float
    last_status: int | None
    last_error: str
    sent_at: float | None
    transport: str = TRANSPORT_CSTORE  # how it is sent (dicomout.transports)
    transfer_syntax_uid: str = ""  # the syntax the destination stored it in ("" until sent, or unknown)


def _item(row: Row) -> OutboxItem:
    return OutboxItem(
        id=int(row["id"]),
        destination=row["destination"],
        path=Path(row["path"]),
        sop_class_uid=row["sop_class_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        study_instance_uid=row["study_instance_uid"],
        job_id=None if row["job_id"] is None else int(row["job_id"]),
        state=row["state"],
        attempts=int(row["attempts"]),
        generation=int(row["generation"]),
        created_at=float(row["created_at"]),
        next_attempt_at=float(row["next_attempt_at"]),
        last_status=None if row["last_status"] is None else int(row["last_status"]),
        last_error=row["last_error"],
        sent_at=None if row["sent_at"] is None else float(row["sent_at"]),
        transport=row["transport"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
    )


class Outbox:
    """The ``outbox`` table of the node's database at ``db_path`` (SQLite file or PostgreSQL URL); thread-safe.

    Every call opens its own short connection to the SQLite file (on PostgreSQL it keeps one: a
    connection there costs a round trip and authentication), under a lock, so the object may be
    shared by the scheduler and the workflow threads.
    """

    def __init__(self, db_path: Path | str | PostgresUrl, policy: RetryPolicy | None = None) -> None:
        self.db_path = db_target(db_path)
        self.policy = policy or RetryPolicy()
        self._lock = threading.RLock()
        #: held by send_pending so that two runs never send the same items twice.
        self.send_lock = threading.Lock()
        self._kept: Connection | None = None
        if isinstance(self.db_path, PostgresUrl):
            self._kept = open_db(self.db_path, _SCHEMA, autocommit=False)
        with self._connect() as conn:
            if conn.dialect == SQLITE:  # a PostgreSQL database never had the older schema
                conn.executescript(_SCHEMA)
                _add_transport_column(conn)

    def close(self) -> None:
        """Close the kept PostgreSQL connection (nothing to do on SQLite)."""
        with self._lock:
            if self._kept is not None:
                self._kept.close()
                self._kept = None

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        with self._lock:
            if self._kept is not None:
                with self._kept:  # one transaction: commit, or roll back on error
                    yield self._kept
                return
            conn = open_db(self.db_path, autocommit=False)
            try:
                with conn:  # one transaction: commit, or roll back on error
                    yield conn
            finally:
                conn.close()

    def enqueue(
        self,
        path: Path,
        destination: str,
        *,
        job_id: int | None,
        study_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        now: float | None = None,
        transport: str = TRANSPORT_CSTORE,
    ) -> int:
        """Queue ``path`` for ``destination``, to be sent by ``transport``; returns the item id.

        Idempotent on (destination, SOP Instance UID): queueing the same object again
        (reprocessing) resets the existing item to pending, with the new path and job,
        zero attempts and a fresh ``created_at``, instead of adding a second item.
        """
        for name, value in (
            ("destination", destination),
            ("study_uid", study_uid),
            ("sop_class_uid", sop_class_uid),
            ("sop_instance_uid", sop_instance_uid),
            ("transport", transport),
        ):
            if not isinstance(value, str) or not value.strip():
                raise OutputError(
                    f"Outbox.enqueue: {name} is {value!r} (allowed: a non-empty string)",
                    job_id=job_id,
                    study_uid=study_uid if isinstance(study_uid, str) else None,
                )
        now = time.time() if now is None else now
        with self._connect() as conn:
            row = conn.execute(
                """
                INSERT INTO outbox (destination, path, sop_class_uid, sop_instance_uid, study_instance_uid,
                                    job_id, state, attempts, generation, created_at, next_attempt_at, transport)
                VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, 1, ?, ?, ?)
                ON CONFLICT (destination, sop_instance_uid) DO UPDATE SET
                    path = excluded.path,
                    transport = excluded.transport,
                    sop_class_uid = excluded.sop_class_uid,
                    study_instance_uid = excluded.study_instance_uid,
                    job_id = excluded.job_id,
                    state = 'pending',
                    attempts = 0,
                    generation = outbox.generation + 1,
                    created_at = excluded.created_at,
                    next_attempt_at = excluded.next_attempt_at,
                    last_status = NULL,
                    last_error = '',
                    sent_at = NULL,
                    transfer_syntax_uid = ''
                RETURNING id, generation
                """,
                (destination, str(path), sop_class_uid, sop_instance_uid, study_uid, job_id, now, now, transport),
            ).fetchone()
        item_id, generation = int(row[0]), int(row[1])
        if generation > 1:
            LOGGER.info(
                "outbox item %d re-queued for %s: SOP Instance UID %s (job %s, generation %d)",
                item_id, destination, sop_instance_uid, job_id, generation,
            )
        return item_id

    def get(self, item_id: int) -> OutboxItem | None:
        """The item with this id, or None."""
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else _item(row)

    def due(self, now: float | None = None, limit: int | None = None) -> list[OutboxItem]:
        """Pending items whose next attempt is due at ``now``, oldest first."""
        now = time.time() if now is None else now
        sql = f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id"
        params: tuple[object, ...] = (now,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (now, limit)
        with self._connect() as conn:
            return [_item(r) for r in conn.execute(sql, params)]

    def _update(self, item: OutboxItem, sets: str, params: tuple[object, ...]) -> OutboxItem | None:
        """Apply ``sets`` to the item if it is still the same pending generation."""
        with self._connect() as conn:
            cur = conn.execute(
                f"UPDATE outbox SET {sets} WHERE id = ? AND generation = ? AND state = 'pending'",
                (*params, item.id, item.generation),
            )
            if cur.rowcount == 0:
                LOGGER.info(
                    "outbox item %d (SOP Instance UID %s) changed while it was being sent; outcome not recorded",
                    item.id, item.sop_instance_uid,
                )
                return None
            row = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (item.id,)).fetchone()
        return _item(row)

    def mark_sent(
        self, item: OutboxItem, status: int | None = 0, now: float | None = None, *, transfer_syntax_uid: str = ""
    ) -> OutboxItem | None:
        """Record that the object was stored by the destination (state ``sent``) in ``transfer_syntax_uid``
        (the accepted presentation context's syntax; "" when the transport does not say)."""
        now = time.time() if now is None else now
        return self._update(
            item,
            "state = 'sent', attempts = attempts + 1, last_status = ?, last_error = '', sent_at = ?, "
            "transfer_syntax_uid = ?",
            (status, now, transfer_syntax_uid),
        )

    def mark_retry(
        self,
        item: OutboxItem,
        error: str,
        status: int | None,
        now: float | None = None,
        *,
        permanent: bool = False,
    ) -> OutboxItem | None:
        """Record a failed attempt: schedule a retry with backoff, or fail the item when the
        error is permanent, ``max_attempts`` is reached or the item is older than ``max_age_s``.

        Returns the updated item (None when the item was re-enqueued meanwhile).
        """
        now = time.time() if now is None else now
        attempts = item.attempts + 1
        give_up = ""
        if permanent:
            give_up = "permanent error"
        elif self.policy.max_attempts and attempts >= self.policy.max_attempts:
            give_up = f"gave up after {attempts} attempts (max_attempts {self.policy.max_attempts})"
        elif now - item.created_at >= self.policy.max_age_s:
            give_up = (
                f"gave up after {now - item.created_at:.0f} s in the outbox (max_age_s {self.policy.max_age_s:g})"
            )
        if give_up:
            message = error if permanent else f"{error} ({give_up})"
            return self._update(
                item,
                "state = 'failed', attempts = ?, last_status = ?, last_error = ?, next_attempt_at = ?",
                (attempts, status, message, now),
            )
        return self._update(
            item,
            "attempts = ?, last_status = ?, last_error = ?, next_attempt_at = ?",
            (attempts, status, error, now + self.policy.delay_s(attempts)),
        )

    def resend(
        self,
        *,
        item_id: int | None = None,
        job_id: int | None = None,
        destination: str | None = None,
        failed_only: bool = False,
        now: float | None = None,
    ) -> list[OutboxItem]:
        """Queue items again (operator's `thighnode resend`); returns the items now pending again.

        Exactly one selector: ``item_id`` (that item), ``job_id`` (the job's items) or
        ``destination`` (its items; with ``failed_only`` only the failed ones). ``failed_only``
        restricts any selector to failed items. Each selected item that is not pending
        becomes pending with zero attempts, a new ``created_at`` (so ``max_age_s`` counts
        from now) and the next generation; items already pending are left as they are, so
        asking twice sends once. The same file and SOP Instance UID are sent again.
        Raises :class:`OutputError` when no selector or more than one is given, or an item id
        does not exist.
        """
        given = [name for name, v in (("item", item_id), ("job", job_id), ("destination", destination)) if v is not None]
        if len(given) != 1:
            raise OutputError(
                f"Outbox.resend: selectors given: {', '.join(given) or 'none'} (allowed: exactly one of item, job, "
                "destination)"
            )
        now = time.time() if now is None else now
        if item_id is not None:
            where, params = "id = ?", [item_id]
        elif job_id is not None:
            where, params = "job_id = ?", [job_id]
        else:
            where, params = "destination = ?", [destination]
        where += " AND state != 'pending'"
        if failed_only:
            where += " AND state = 'failed'"
        with self._connect() as conn:
            if item_id is not None and conn.execute("SELECT 1 FROM outbox WHERE id = ?", (item_id,)).fetchone() is None:
                raise OutputError(f"Outbox.resend: there is no outbox item {item_id}")
            rows = conn.execute(
                f"""
                UPDATE outbox SET state = 'pending', attempts = 0, generation = generation + 1, created_at = ?,
                    next_attempt_at = ?, last_status = NULL, last_error = '', sent_at = NULL, transfer_syntax_uid = ''
                WHERE {where} RETURNING {_COLUMNS}
                """,
                (now, now, *params),
            ).fetchall()
        items = sorted((_item(r) for r in rows), key=lambda i: i.id)
        for item in items:
            LOGGER.info(
                "outbox item %d queued again for %s by the operator: SOP Instance UID %s (job %s, generation %d)",
                item.id, item.destination, item.sop_instance_uid, item.job_id, item.generation,
            )
        return items

    def items(self, study_uid: str | None = None) -> list[OutboxItem]:
        """All items (of one study when ``study_uid`` is given), in id order."""
        with self._connect() as conn:
            if study_uid is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE study_instance_uid = ? ORDER BY id", (study_uid,)
                ).fetchall()
        return [_item(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of items per state; every state is present (0 when none)."""
        counts = dict.fromkeys(STATES, 0)
        with self._connect() as conn:
            for state, n in conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
                counts[state] = int(n)
        return counts

    def backlog(self) -> list[Backlog]:
        """Pending items per destination (the node's metrics), by destination name."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT destination, COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending' "
                "GROUP BY destination ORDER BY destination"
            ).fetchall()
        return [Backlog(str(r[0]), int(r[1]), float(r[2])) for r in rows]


#: Told of each batch's objects the destination confirmed (Success or Warning), after they were marked sent.
SentCallback = Callable[[Destination, tuple[OutboxItem, ...]], None]


@dataclass(frozen=True)
class Backlog:
    """Pending items of one destination: how many, and when the oldest was (re-)enqueued (POSIX s)."""

    destination: str
    pending: int
    oldest_created_at: float


def send_pending(
    outbox: Outbox,
    destinations: Mapping[str, Destination],
    now: float | None = None,
    transports: Mapping[str, Transport] = DEFAULT_TRANSPORTS,
    on_sent: SentCallback | None = None,
) -> int:
    """Send every due item, one batch per destination and transport kind; returns how many were stored.

    Called periodically by the node's scheduler. Safe to call again after a crash
    (state lives in SQLite). A concurrent call on the same :class:`Outbox` returns 0
    at once instead of sending the same items twice. Items whose destination is no
    longer configured, or whose transport kind is not in ``transports``, fail with
    that reason. ``on_sent`` (the node's audit trail) is called once per batch with
    the items the destination confirmed; an exception there is logged, never raised.
    """
    if not outbox.send_lock.acquire(blocking=False):
        LOGGER.info("send_pending already running on %s; skipped", outbox.db_path)
        return 0
    try:
        return _send_pending(outbox, destinations, now, transports, on_sent)
    finally:
        outbox.send_lock.release()


def _stamp(now: float | None) -> float:
    return time.time() if now is None else now


def _log_failure(outbox: Outbox, item: OutboxItem, updated: OutboxItem | None, status: int | None) -> None:
    """One line per failed object: SOP Instance UID, status, reason and what happens next."""
    if updated is None:
        return
    status_text = "no status" if status is None else describe_status(status)
    if updated.state == STATE_FAILED:
        LOGGER.warning(
            "outbox item %d failed for %s: SOP Instance UID %s, %s: %s",
            item.id, item.destination, item.sop_instance_uid, status_text, updated.last_error,
        )
    else:
        LOGGER.warning(
            "outbox item %d to %s will be retried in %.0f s (attempt %d): SOP Instance UID %s, %s: %s",
            item.id, item.destination, outbox.policy.delay_s(updated.attempts), updated.attempts,
            item.sop_instance_uid, status_text, updated.last_error,
        )


def _fail_all(outbox: Outbox, items: list[OutboxItem], error: str, now: float | None) -> None:
    for item in items:
        updated = outbox.mark_retry(item, error, None, _stamp(now), permanent=True)
        _log_failure(outbox, item, updated, None)


def _send_pending(
    outbox: Outbox,
    destinations: Mapping[str, Destination],
    now: float | None,
    transports: Mapping[str, Transport],
    on_sent: SentCallback | None = None,
) -> int:
    batches: dict[tuple[str, str], list[OutboxItem]] = {}
    for item in outbox.due(_stamp(now)):
        batches.setdefault((item.destination, item.transport), []).append(item)

    stored = 0
    for (name, kind), items in batches.items():
        destination = destinations.get(name)
        if destination is None:
            configured = ", ".join(sorted(destinations)) or "none"
            _fail_all(outbox, items, f"destination {name!r} is no longer configured (configured: {configured})", now)
            continue
        transport = transports.get(kind)
        if transport is None:
            available = ", ".join(sorted(transports)) or "none"
            _fail_all(outbox, items, f"transport {kind!r} of {name!r} is not available (available: {available})", now)
            continue
        stored += _send_batch(outbox, items, destination, transport, now, on_sent)
    return stored


def _send_batch(
    outbox: Outbox,
    items: list[OutboxItem],
    destination: Destination,
    transport: Transport,
    now: float | None,
    on_sent: SentCallback | None = None,
) -> int:
    """Send one destination's due items of one transport kind and record each outcome; returns how many were stored."""
    started = time.monotonic()
    results = transport.send([item.path for item in items], destination)
    sent = retrying = failed = 0
    confirmed: list[OutboxItem] = []
    for item, result in zip(items, results, strict=True):
        if result.ok:
            marked = outbox.mark_sent(item, result.status, _stamp(now), transfer_syntax_uid=result.transfer_syntax_uid)
            if marked is not None:
                sent += 1
                confirmed.append(marked)
            continue
        error = result.error
        if result.sop_instance_uid and result.sop_instance_uid != item.sop_instance_uid:
            error = (
                f"{item.path} holds SOP Instance UID {result.sop_instance_uid}, "
                f"not the queued {item.sop_instance_uid}; {error}"
            )
        updated = outbox.mark_retry(item, error, result.status, _stamp(now), permanent=result.permanent)
        _log_failure(outbox, item, updated, result.status)
        if updated is not None:
            if updated.state == STATE_FAILED:
                failed += 1
            else:
                retrying += 1
    LOGGER.info(
        "outbox batch to %s: %d objects, %d sent, %d to retry, %d failed in %.2f s",
        destination.label, len(items), sent, retrying, failed, time.monotonic() - started,
    )
    if confirmed and on_sent is not None:
        try:
            on_sent(destination, tuple(confirmed))
        except Exception:  # noqa: BLE001 - the items are sent; a failing listener must not undo that
            LOGGER.exception("outbox: the listener of %d sent objects to %s failed", len(confirmed), destination.label)
    return sent
