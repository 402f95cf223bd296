"""The durable job store (the node's database: SQLite in WAL mode, or PostgreSQL): one job per processing of a study.

States and transitions (every transition is recorded in ``job_events`` with its
time and reason)::

    received --(quiet period passed)--> ready --(claimed by a worker)--> running
    ready    --(new instances)-------> received
    running  --> done | declined | failed
    running  --(node restarted while it ran)--> ready, or failed once it was started
               max_job_attempts times ("crashed the node N times")
    running  --(the broker refused the task: celery backend)--> ready

A study that receives instances after its job left ``received``/``ready`` gets a
new job (the old one keeps its record); when what arrived is a Segmentation (a reader's
correction, or the node's own SEG echoed back) the workflow handles it without running the
model again (:mod:`thighnode.corrections`). After a crash or ``kill -9``,
:meth:`JobStore.recover` puts every ``running`` job back to ``ready``; since a job
is only marked ``done`` after its outputs were queued (idempotently), a job is
never finished twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from node_errors import NodeError
from scp.db import Connection, Row, SqliteStore

log = logging.getLogger(__name__)

RECEIVED = "received"
READY = "ready"
RUNNING = "running"
DONE = "done"
DECLINED = "declined"
FAILED = "failed"
STATES = (RECEIVED, READY, RUNNING, DONE, DECLINED, FAILED)
FINAL_STATES = (DONE, DECLINED, FAILED)

_TRANSITIONS: dict[str, tuple[str, ...]] = {
    RECEIVED: (READY,),
    READY: (RECEIVED, RUNNING),
    RUNNING: (DONE, DECLINED, FAILED, READY),
    DONE: (),
    DECLINED: (),
    FAILED: (READY,),  # `thighnode retry`
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    received_through REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    series_uid TEXT NOT NULL DEFAULT '',
    timings_json TEXT NOT NULL DEFAULT '{}',
    result_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, id);
"""


class JobStoreError(NodeError):
    """An impossible job transition or a damaged job store."""


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    state: str
    reason: str
    created_at: float
    updated_at: float
    received_through: float
    attempts: int
    series_uid: str
    timings_s: dict[str, float]
    result: dict[str, Any]


@dataclass(frozen=True)
class JobEvent:
    job_id: int
    at: float
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True)
class StudyProgress:
    """What the job store needs to know of a study in the instance index."""

    study_uid: str
    last_received_at: float


def _row_to_job(row: Row) -> Job:
    return Job(
        id=row["id"],
        study_uid=row["study_uid"],
        state=row["state"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        received_through=row["received_through"],
        attempts=row["attempts"],
        series_uid=row["series_uid"],
        timings_s=json.loads(row["timings_json"]),
        result=json.loads(row["result_json"]),
    )


class JobStore(SqliteStore):
    """Jobs in SQLite; safe to share between threads (one connection behind a lock)."""

    SCHEMA = _SCHEMA

    # -- transactions ------------------------------------------------------------------

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def _set_state(
        self,
        job_id: int,
        to_state: str,
        reason: str,
        now: float,
        *,
        expected: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"job {job_id} does not exist", job_id=job_id)
        from_state = row["state"]
        if expected is not None and from_state != expected:
            raise JobStoreError(
                f"job {job_id}: expected state {expected!r}, found {from_state!r}", job_id=job_id
            )
        if to_state not in _TRANSITIONS[from_state]:
            raise JobStoreError(
                f"job {job_id}: transition {from_state} -> {to_state} is not allowed; "
                f"allowed from {from_state}: {', '.join(_TRANSITIONS[from_state]) or 'none'}",
                job_id=job_id,
            )
        sets = ["state = ?", "reason = ?", "updated_at = ?"]
        args: list[Any] = [to_state, reason, now]
        for key, value in (extra or {}).items():
            sets.append(f"{key} = ?")
            args.append(value)
        self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
        self._db.execute(
            "INSERT INTO job_events(job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, now, from_state, to_state, reason),
        )
        log.info("job %d: %s -> %s%s", job_id, from_state, to_state, f" ({reason})" if reason else "")

    def _create(self, study_uid: str, received_through: float, reason: str, now: float) -> int:
        job_id = int(self._db.execute(
            "INSERT INTO jobs(study_uid, state, reason, created_at, updated_at, received_through) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (study_uid, RECEIVED, reason, now, now, received_through),
        ).fetchone()[0])
        self._db.execute(
            "INSERT INTO job_events(job_id, at, from_state, to_state, reason) VALUES (?, ?, '', ?, ?)",
            (job_id, now, RECEIVED, reason),
        )
        log.info("job %d: created for study %s (%s)", job_id, study_uid, reason)
        return job_id

    # -- the assembler's tick ----------------------------------------------------------

    def sync(
        self,
        studies: Iterable[StudyProgress],
        now: float,
        quiet_period_s: float,
        *,
        started_at: float | None = None,
    ) -> list[int]:
        """Create/reopen jobs for studies with new instances, then promote quiet ones to ready.

        A study is quiet when nothing arrived for ``quiet_period_s`` *while the node ran*:
        with ``started_at`` (when this node process started), time before it does not count,
        so a study that was still arriving when the node stopped waits a whole quiet period
        after the restart (its sender may be resending what it could not deliver meanwhile).
        Returns the ids of jobs that became ready.
        """
        with self._tx():
            for study in studies:
                latest = self._db.execute(
                    "SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (study.study_uid,)
                ).fetchone()
                if latest is None:
                    self._create(study.study_uid, study.last_received_at, "first instance received", now)
                    continue
                if study.last_received_at <= latest["received_through"]:
                    continue
                if latest["state"] == RECEIVED:
                    self._db.execute(
                        "UPDATE jobs SET received_through = ?, updated_at = ? WHERE id = ?",
                        (study.last_received_at, now, latest["id"]),
                    )
                elif latest["state"] == READY:
                    self._set_state(
                        latest["id"], RECEIVED, "reopened: instances arrived during the quiet period", now,
                        extra={"received_through": study.last_received_at},
                    )
                else:
                    self._create(
                        study.study_uid,
                        study.last_received_at,
                        f"instances arrived after job {latest['id']} ({latest['state']}); study reprocessed",
                        now,
                    )
            ready = []
            if started_at is not None and started_at > now - quiet_period_s:
                return ready  # the node has not run for a quiet period yet
            rows = self._db.execute(
                "SELECT id, received_through FROM jobs WHERE state = ? AND received_through <= ? ORDER BY id",
                (RECEIVED, now - quiet_period_s),
            ).fetchall()
            for row in rows:
                why = f"no instance for {quiet_period_s:g} s"
                if started_at is not None and row["received_through"] < started_at:
                    why += " since the node started"
                self._set_state(row["id"], READY, why, now)
                ready.append(int(row["id"]))
            return ready

    # -- workers ---------------------------------------------------------------------------

    def claim_next(self, now: float | None = None) -> Job | None:
        """Atomically take the oldest ready job whose study has no running job; mark it running."""
        now = time.time() if now is None else now
        with self._tx():
            row = self._db.execute(
                "SELECT * FROM jobs j WHERE state = ? AND NOT EXISTS "
                "(SELECT 1 FROM jobs r WHERE r.study_uid = j.study_uid AND r.state = ?) ORDER BY id LIMIT 1",
                (READY, RUNNING),
            ).fetchone()
            if row is None:
                return None
            self._set_state(row["id"], RUNNING, "claimed by a worker", now, extra={"attempts": row["attempts"] + 1})
            return self.get(int(row["id"]))

    def finish(
        self,
        job_id: int,
        state: str,
        reason: str,
        *,
        series_uid: str = "",
        timings_s: dict[str, float] | None = None,
        result: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """running -> done / declined / failed, with the reason and per-stage timings."""
        if state not in FINAL_STATES:
            raise JobStoreError(f"job {job_id}: finish state {state!r} must be one of {FINAL_STATES}", job_id=job_id)
        now = time.time() if now is None else now
        with self._tx():
            self._set_state(
                job_id, state, reason, now, expected=RUNNING,
                extra={
                    "series_uid": series_uid,
                    "timings_json": json.dumps(timings_s or {}),
                    "result_json": json.dumps(result or {}),
                },
            )

    def release(self, job_id: int, reason: str, now: float | None = None) -> None:
        """running -> ready: a claimed job could not be handed to a worker (the broker was unreachable)."""
        now = time.time() if now is None else now
        with self._tx():
            self._set_state(job_id, READY, reason, now, expected=RUNNING)

    def recover(self, now: float | None = None, *, max_attempts: int | None = None) -> list[int]:
        """At start-up: every job left running by a crash goes back to ready; returns their ids.

        ``attempts`` is counted (and committed) when a job is claimed, before its work starts,
        so a job whose work kills the process counts each time. A job already started
        ``max_attempts`` times is failed instead ("crashed the node N times"), so a study that
        kills the node cannot crash-loop it; it is not in the returned list.
        """
        now = time.time() if now is None else now
        resumed = []
        with self._tx():
            rows = self._db.execute(
                "SELECT id, attempts FROM jobs WHERE state = ? ORDER BY id", (RUNNING,)
            ).fetchall()
            for row in rows:
                attempts = int(row["attempts"])
                if max_attempts is not None and attempts >= max_attempts:
                    self._set_state(
                        row["id"], FAILED,
                        f"crashed the node {attempts} times: started {attempts} times and never finished "
                        f"(max_job_attempts {max_attempts}); `thighnode retry {row['id']}` tries once more",
                        now,
                    )
                    continue
                self._set_state(row["id"], READY, "resumed: the node stopped while the job ran", now)
                resumed.append(int(row["id"]))
            return resumed

    def requeue(self, study_uid: str, reason: str, now: float | None = None) -> int:
        """A new ready job for an already received study (e.g. its prior has arrived)."""
        now = time.time() if now is None else now
        with self._tx():
            latest = self._db.execute(
                "SELECT received_through FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (study_uid,)
            ).fetchone()
            if latest is None:
                raise JobStoreError(f"study {study_uid} has no job to requeue", study_uid=study_uid)
            job_id = self._create(study_uid, latest["received_through"], reason, now)
            self._set_state(job_id, READY, reason, now)
            return job_id

    def retry(self, job_id: int, now: float | None = None) -> None:
        """A failed job goes back to ready (operator's `thighnode retry`)."""
        now = time.time() if now is None else now
        with self._tx():
            self._set_state(job_id, READY, "retry requested by operator", now, expected=FAILED)

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"job {job_id} does not exist", job_id=job_id)
        return _row_to_job(row)

    def jobs(self, *, study_uid: str | None = None, state: str | None = None, limit: int = 1000) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        where = []
        if study_uid is not None:
            where.append("study_uid = ?")
            args.append(study_uid)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_row_to_job(r) for r in self._db.execute(query, args).fetchall()]

    def events(self, job_id: int) -> list[JobEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [JobEvent(r["job_id"], r["at"], r["from_state"], r["to_state"], r["reason"]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    def stage_durations(self) -> dict[str, tuple[int, float]]:
        """Per stage of the recorded timings (``finish(timings_s=...)``): (jobs that ran it, seconds in all)."""
        with self._lock:
            rows = self._db.execute("SELECT timings_json FROM jobs WHERE timings_json != '{}'").fetchall()
        totals: dict[str, tuple[int, float]] = {}
        for row in rows:
            for stage, seconds in json.loads(row[0]).items():
                if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                    n, s = totals.get(stage, (0, 0.0))
                    totals[stage] = (n + 1, s + float(seconds))
        return totals


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock (rolls back on error): one writer transaction at a
    time across every process (on PostgreSQL, :mod:`scp.db_postgres` holds its writer lock)."""

    def __init__(self, db: Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()

