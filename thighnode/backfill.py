"""Archive backfill: every matching study of a PACS through the node, for cohort research.

``thighnode backfill`` queries the PACS (the ``[prior]`` Q/R source: C-FIND at STUDY level by
date range, modality and study description, then at SERIES level by body part), retrieves each
matching study to the running node (C-MOVE to the node's AE title, or C-GET stored into the spool)
and follows it through the node's own path (quiet period, job, segmentation, measurement; local
workers or Celery, whatever ``[compute]`` says) until its job ends. Every study gets a row in
``backfill_studies``: pending -> retrieved -> done / declined / failed, with the reason. The run is
resumable: a stopped run (Ctrl-C, SIGTERM, ``--max-studies``) starts again where it stopped, and a
study that is already done, declined or failed is never retrieved again (``--retry-failed`` takes
the failed ones again). With ``--no-send`` the node keeps the study's outputs and results (for
``thighnode cohort``) but sends nothing to the PACS.

The node must be running on the same data directory (``thighnode serve``): the scheduler stays the
one authority over jobs; this command only retrieves and watches. The table holds UIDs, dates and
reasons, never a patient's name, ID or birth date.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from scp.db import SqliteStore
from thighnode.jobs import DECLINED, DONE, FAILED, FINAL_STATES, JobStore

log = logging.getLogger(__name__)

PENDING = "pending"
RETRIEVED = "retrieved"
BACKFILL_STATES = (PENDING, RETRIEVED, DONE, DECLINED, FAILED)
BACKFILL_FINAL = (DONE, DECLINED, FAILED)

#: Series descriptions that are never the CT of the thighs (same rule as the prior search).
_NOT_IMAGES = ("localizer", "scout", "topogram", "dose")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS backfill_studies (
    study_uid TEXT PRIMARY KEY,
    study_date TEXT NOT NULL DEFAULT '',
    series_uids TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    no_send INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    job_id INTEGER,
    jobs_before INTEGER NOT NULL DEFAULT 0,
    retrieved_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS backfill_state ON backfill_studies(state, study_date);
"""


@dataclass(frozen=True)
class BackfillStudy:
    study_uid: str
    study_date: str
    series_uids: tuple[str, ...]
    state: str
    reason: str
    no_send: bool
    attempts: int
    job_id: int | None
    jobs_before: int
    retrieved_at: float | None


@dataclass(frozen=True)
class BackfillCriteria:
    """What to take from the archive. Dates are DA (YYYYMMDD), inclusive; ``body_parts`` are
    BodyPartExamined values (upper case; a series without one is kept and the node's field-of-view
    check decides); ``description`` a StudyDescription pattern (``*``/``?``)."""

    date_from: str
    date_to: str
    modality: str = "CT"
    body_parts: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class BackfillProgress:
    done: int
    declined: int
    failed: int
    in_flight: int
    pending: int
    rate_per_h: float | None  # studies ended per hour in this run
    left_s: float | None  # estimated time left

    @property
    def total(self) -> int:
        return self.done + self.declined + self.failed + self.in_flight + self.pending

    def line(self) -> str:
        rate = "-" if self.rate_per_h is None else f"{self.rate_per_h:.1f}/h"
        left = "-" if self.left_s is None else _duration(self.left_s)
        return (f"{self.done + self.declined + self.failed}/{self.total} ended: {self.done} done, "
                f"{self.declined} declined, {self.failed} failed; {self.in_flight} in flight, {self.pending} pending; "
                f"rate {rate}, time left {left}")


class BackfillStore(SqliteStore):
    """The backfill's per-study records, in the node's SQLite database (thread-safe)."""

    SCHEMA = _SCHEMA

    def add(self, study_uid: str, study_date: str, *, no_send: bool, now: float | None = None) -> bool:
        """Record a matching study as pending; False (unchanged) when it is already recorded."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO backfill_studies (study_uid, study_date, state, no_send, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", (study_uid, study_date, PENDING, int(no_send), now, now),
            )
            return cur.rowcount == 1

    def set(self, study_uid: str, state: str, reason: str = "", *, now: float | None = None, **fields: object) -> None:
        if state not in BACKFILL_STATES:
            raise ValueError(f"backfill state {state!r}; allowed: {', '.join(BACKFILL_STATES)}")
        allowed = {"series_uids", "attempts", "job_id", "jobs_before", "retrieved_at"}
        if set(fields) - allowed:
            raise ValueError(f"unknown backfill fields {sorted(set(fields) - allowed)}; allowed: {sorted(allowed)}")
        values = {k: (" ".join(v) if k == "series_uids" else v) for k, v in fields.items()}  # type: ignore[arg-type]
        cols = ", ".join(f"{k} = ?" for k in values)
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute(
                f"UPDATE backfill_studies SET state = ?, reason = ?, updated_at = ?{', ' + cols if cols else ''}"
                " WHERE study_uid = ?", (state, reason, now, *values.values(), study_uid),
            )

    def get(self, study_uid: str) -> BackfillStudy | None:
        rows = self._rows("WHERE study_uid = ?", (study_uid,))
        return rows[0] if rows else None

    def studies(self, state: str | None = None) -> list[BackfillStudy]:
        if state is None:
            return self._rows("ORDER BY study_date, study_uid", ())
        return self._rows("WHERE state = ? ORDER BY study_date, study_uid", (state,))

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM backfill_studies GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    def holds_outputs(self, study_uid: str) -> bool:
        """True when the study came through a ``--no-send`` backfill: outputs stay on the node."""
        with self._lock:
            row = self._db.execute("SELECT no_send FROM backfill_studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return bool(row and row["no_send"])

    def _rows(self, where: str, args: tuple) -> list[BackfillStudy]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM backfill_studies {where}", args).fetchall()
        return [
            BackfillStudy(
                study_uid=r["study_uid"], study_date=r["study_date"],
                series_uids=tuple(u for u in r["series_uids"].split(" ") if u), state=r["state"], reason=r["reason"],
                no_send=bool(r["no_send"]), attempts=int(r["attempts"]), job_id=r["job_id"],
                jobs_before=int(r["jobs_before"]), retrieved_at=r["retrieved_at"],
            )
            for r in rows
        ]


class Retriever(Protocol):
    def __call__(self, study_uid: str, series_uids: tuple[str, ...]) -> str: ...  # '' on success, else the reason


class Backfill:
    """One backfill run against the node's database (see the module docstring).

    ``find_studies(criteria)`` and ``find_series(study_uid)`` are the PACS queries
    (scp.query.find_studies_in_range / find_series on the Q/R source); ``retrieve(study_uid,
    series_uids)`` brings the series to the node ('' on success, else the reason).
    """

    def __init__(
        self,
        store: BackfillStore,
        jobs: JobStore,
        *,
        find_studies: Callable[[BackfillCriteria], list],
        find_series: Callable[[str], list],
        retrieve: Retriever,
        min_slices: int = 1,
        arrival_timeout_s: float = 900.0,
        retrieve_attempts: int = 3,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        report: Callable[[BackfillProgress], None] | None = None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._find_studies = find_studies
        self._find_series = find_series
        self._retrieve = retrieve
        self._min_slices = min_slices
        self._arrival_timeout_s = arrival_timeout_s
        self._retrieve_attempts = retrieve_attempts
        self._clock = clock
        self._sleep = sleep
        self._report = report

    # -- query -------------------------------------------------------------------------------

    def query(self, criteria: BackfillCriteria, *, no_send: bool) -> tuple[int, int]:
        """C-FIND the archive and record new matches as pending. Returns (matches, newly recorded)."""
        matches = self._find_studies(criteria)
        new = 0
        for m in matches:
            if self._store.add(m.study_instance_uid, m.study_date, no_send=no_send):
                new += 1
        log.info("backfill query %s..%s: %d studies match, %d new", criteria.date_from, criteria.date_to,
                 len(matches), new)
        return len(matches), new

    # -- run ---------------------------------------------------------------------------------

    def run(
        self,
        criteria: BackfillCriteria,
        *,
        in_flight: int = 2,
        max_studies: int | None = None,
        poll_s: float = 2.0,
        retry_failed: bool = False,
        stop: threading.Event | None = None,
    ) -> BackfillProgress:
        """Retrieve pending studies (at most ``in_flight`` at once) and follow their jobs until every
        study has ended, ``max_studies`` have been started in this run, or ``stop`` is set."""
        if in_flight < 1:
            raise ValueError(f"in_flight is {in_flight}; allowed: >= 1")
        if retry_failed:
            for s in self._store.studies(FAILED):
                self._store.set(s.study_uid, PENDING, f"retried after: {s.reason}")
        stop = stop or threading.Event()
        started_at, ended_at_start = self._clock(), _ended(self._store.counts())
        started = 0
        last_report = 0.0
        while not stop.is_set():
            self._follow()
            flying = self._store.studies(RETRIEVED)
            pending = self._store.studies(PENDING)
            room = in_flight - len(flying)
            budget = None if max_studies is None else max_studies - started
            for s in pending[: max(0, min(room, budget if budget is not None else room))]:
                if stop.is_set():
                    break
                self._start(s, criteria)
                started += 1
            progress = self.progress(started_at, ended_at_start)
            now = self._clock()
            if self._report is not None and (now - last_report >= 10.0 or progress.in_flight == 0):
                self._report(progress)
                last_report = now
            out_of_budget = budget is not None and started >= (max_studies or 0)
            if progress.in_flight == 0 and (progress.pending == 0 or out_of_budget):
                break
            self._sleep(poll_s)
        return self.progress(started_at, ended_at_start)

    def progress(self, started_at: float | None = None, ended_at_start: int = 0) -> BackfillProgress:
        counts = self._store.counts()
        ended = _ended(counts)
        rate = left = None
        if started_at is not None:
            elapsed = self._clock() - started_at
            if elapsed > 0 and ended > ended_at_start:
                rate = (ended - ended_at_start) / elapsed * 3600.0
                left = (counts.get(PENDING, 0) + counts.get(RETRIEVED, 0)) / rate * 3600.0
        return BackfillProgress(
            done=counts.get(DONE, 0), declined=counts.get(DECLINED, 0), failed=counts.get(FAILED, 0),
            in_flight=counts.get(RETRIEVED, 0), pending=counts.get(PENDING, 0), rate_per_h=rate, left_s=left,
        )

    def _start(self, study: BackfillStudy, criteria: BackfillCriteria) -> None:
        from scp.errors import QueryFailedError

        uid = study.study_uid
        existing = self._jobs.jobs(study_uid=uid, limit=1)
        if existing and existing[0].state in FINAL_STATES:
            # already through the node (a scanner sent it, or an earlier backfill): not redone
            job = existing[0]
            self._store.set(uid, _backfill_state(job.state), f"already processed by the node: {job.reason}",
                            job_id=job.id)
            return
        try:
            series = self._find_series(uid)
        except QueryFailedError as exc:
            self._failed_attempt(study, f"series query failed: {exc.message}")
            return
        wanted = {b.upper() for b in criteria.body_parts}
        usable = [
            s for s in series
            if (not criteria.modality or s.modality == criteria.modality)
            and (s.number_of_instances is None or s.number_of_instances >= self._min_slices)
            and not any(w in s.series_description.lower() for w in _NOT_IMAGES)
            and (not wanted or not s.body_part_examined or s.body_part_examined.upper() in wanted)
        ]
        if not usable:
            parts = sorted({s.body_part_examined or "-" for s in series})
            self._store.set(uid, DECLINED, "no series to retrieve: none is "
                            f"{criteria.modality or 'an image series'} with >= {self._min_slices} instances"
                            + (f" of body part {', '.join(sorted(wanted))} (the study's: {', '.join(parts)})"
                               if wanted else ""))
            return
        chosen = tuple(s.series_instance_uid for s in usable)
        jobs_before = len(self._jobs.jobs(study_uid=uid))
        error = self._retrieve(uid, chosen)
        if error:
            self._failed_attempt(study, f"retrieval failed: {error}", series_uids=chosen)
            return
        self._store.set(uid, RETRIEVED, f"{len(chosen)} series retrieved", series_uids=chosen,
                        attempts=study.attempts + 1, jobs_before=jobs_before, retrieved_at=self._clock())
        log.info("backfill: study %s retrieved (%d series)", uid, len(chosen))

    def _failed_attempt(self, study: BackfillStudy, reason: str, **fields: object) -> None:
        attempts = study.attempts + 1
        state = FAILED if attempts >= self._retrieve_attempts else PENDING
        self._store.set(study.study_uid, state, f"{reason} (attempt {attempts} of {self._retrieve_attempts})",
                        attempts=attempts, **fields)
        log.warning("backfill: study %s attempt %d: %s", study.study_uid, attempts, reason)

    def _follow(self) -> None:
        """Retrieved studies whose job has ended take its state and reason."""
        now = self._clock()
        for s in self._store.studies(RETRIEVED):
            jobs = self._jobs.jobs(study_uid=s.study_uid)
            new = jobs[: max(0, len(jobs) - s.jobs_before)]  # newest first: the jobs since the retrieval
            latest = new[0] if new else None
            if latest is not None and latest.state in FINAL_STATES:
                self._store.set(s.study_uid, _backfill_state(latest.state), latest.reason, job_id=latest.id)
                log.info("backfill: study %s %s (job %d)", s.study_uid, latest.state, latest.id)
            elif latest is None and s.retrieved_at is not None and now - s.retrieved_at > self._arrival_timeout_s:
                self._store.set(s.study_uid, FAILED, f"retrieved, but no job started within "
                                f"{self._arrival_timeout_s:g} s: is the node running and the PACS's move "
                                "destination for this node's AE title correct?")


def _ended(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in BACKFILL_FINAL)


def _backfill_state(job_state: str) -> str:
    return {DONE: DONE, DECLINED: DECLINED}.get(job_state, FAILED)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
