"""The node's stores on both backends (SQLite file, PostgreSQL): priors and corrections, and the job claim
from two real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


from thighnode.corrections import ACCEPTED, OWN, CorrectionRecord, CorrectionStore
from thighnode.jobs import RUNNING, JobStore, StudyProgress
from thighnode.priors import ARRIVED, FAILED, REQUESTED, PriorRequests

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_prior_requests_upsert_and_retry_on_both_backends(database: Path | str) -> None:
    store = PriorRequests(database)
    try:
        store.record("1.9", "1.2", prior_study_date="20200101", series_uids=("1.9.1", "1.9.2"), state=FAILED,
                     attempts=1, error="move refused", next_attempt_at=50.0, now=10.0)
        store.record("1.9", "1.3", prior_study_date="20200101", series_uids=("1.9.1",), state=REQUESTED,
                     attempts=1, now=11.0)
        assert [(r.for_study_uid, r.series_uids, r.next_attempt_at) for r in store.due_retries(60.0)] == \
            [("1.2", ("1.9.1", "1.9.2"), 50.0)]
        assert store.due_retries(40.0) == []
        store.record("1.9", "1.2", prior_study_date="20200101", series_uids=("1.9.1",), state=REQUESTED,
                     attempts=2, now=61.0)  # the retry worked: same row, updated
        assert [(r.for_study_uid, r.state, r.attempts) for r in store.for_prior("1.9")] == \
            [("1.2", REQUESTED, 2), ("1.3", REQUESTED, 1)]
        store.mark("1.9", ARRIVED)
        assert {r.state for r in store.for_study("1.2")} == {ARRIVED} and store.is_requested_prior("1.9")
    finally:
        store.close()


def _correction(uid: str, state: str, handled_at: float, **detail: object) -> CorrectionRecord:
    return CorrectionRecord(uid, "1.2", "1.2.1", 7, state, f"{state} reason", "Reader^A", 1.0, handled_at, dict(detail))


def test_a_correction_recorded_again_replaces_its_row_on_both_backends(database: Path | str) -> None:
    store = CorrectionStore(database)
    try:
        store.record(_correction("1.2.99.1", OWN, 10.0))
        store.record(_correction("1.2.99.2", ACCEPTED, 20.0, structures=3))
        store.record(_correction("1.2.99.1", ACCEPTED, 30.0, structures=5))  # handled again (a resumed job)
        records = store.records(study_uid="1.2")
        assert [(r.seg_sop_instance_uid, r.state, r.detail) for r in records] == \
            [("1.2.99.1", ACCEPTED, {"structures": 5}), ("1.2.99.2", ACCEPTED, {"structures": 3})]
        assert store.known(["1.2.99.1", "1.2.99.3"]) == {"1.2.99.1"}
    finally:
        store.close()


_CLAIMER = """
import json, sys, time
from pathlib import Path
from thighnode.jobs import JobStore
store, start, out = JobStore(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.with_suffix(".ready").touch()
while not start.exists():
    time.sleep(0.005)
claimed = []
while (job := store.claim_next()) is not None:
    claimed.append(job.id)
    store.finish(job.id, "done", "finished by " + sys.argv[4])
    time.sleep(0.005)  # the work between two claims, outside the transaction
out.write_text(json.dumps(claimed))
store.close()
"""


def test_two_processes_claiming_jobs_never_claim_the_same_one(database: Path | str, tmp_path: Path) -> None:
    """The node and a worker host (or two workers) claim from the same job store at once: every ready job is
    claimed exactly once (BEGIN IMMEDIATE on SQLite, the advisory writer lock on PostgreSQL)."""
    studies = 120
    store = JobStore(database)
    store.sync([StudyProgress(f"1.2.{i}", 1.0) for i in range(studies)], now=100.0, quiet_period_s=1.0)
    start = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CLAIMER, str(database), str(start), str(tmp_path / f"c{n}.json"),
                          f"claimer {n}"], cwd=REPO_ROOT, env=env)
        for n in (1, 2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"c{n}.ready").exists() for n in (1, 2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        start.touch()  # both have opened the store: they start claiming together
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    first, second = (json.loads((tmp_path / f"c{n}.json").read_text()) for n in (1, 2))
    try:
        assert set(first) & set(second) == set()
        assert sorted(first + second) == [j.id for j in reversed(store.jobs())]
        assert first and second, "both processes claimed jobs (otherwise nothing raced)"
        for job_id in first + second:
            claims = [e for e in store.events(job_id) if e.to_state == RUNNING]
            assert len(claims) == 1, f"job {job_id} claimed {len(claims)} times"
        assert store.counts() == {"done": studies}
    finally:
        store.close()
