"""The durable job store: transitions, quiet period, reopening, crash recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from thighnode.jobs import (
    DECLINED,
    DONE,
    FAILED,
    READY,
    RECEIVED,
    RUNNING,
    JobStore,
    JobStoreError,
    StudyProgress,
)

S1 = "1.2.3.4"


@pytest.fixture
def store(database: Path | str) -> JobStore:
    s = JobStore(database)
    yield s
    s.close()


def test_study_becomes_ready_after_quiet_period(store: JobStore) -> None:
    assert store.sync([StudyProgress(S1, 100.0)], now=101.0, quiet_period_s=30) == []
    (job,) = store.jobs(study_uid=S1)
    assert job.state == RECEIVED
    assert store.sync([StudyProgress(S1, 100.0)], now=129.9, quiet_period_s=30) == []
    assert store.sync([StudyProgress(S1, 100.0)], now=130.0, quiet_period_s=30) == [job.id]
    assert store.get(job.id).state == READY


def test_only_studies_quiet_for_the_period_become_ready(store: JobStore) -> None:
    """Any iterable of progress; among several studies only the quiet ones become ready, in
    job order; a study still receiving stays received."""
    progress = (StudyProgress(uid, last) for uid, last in (("1.1", 100.0), ("1.2", 170.0), ("1.3", 140.0)))
    ready = store.sync(progress, now=200.0, quiet_period_s=60.0)
    assert [store.get(i).study_uid for i in ready] == ["1.1", "1.3"]
    assert [j.state for j in store.jobs(study_uid="1.2")] == [RECEIVED]
    assert store.sync(iter(()), now=200.0, quiet_period_s=60.0) == []


def test_late_instances_push_the_quiet_period_and_reopen_a_ready_study(store: JobStore) -> None:
    store.sync([StudyProgress(S1, 100.0)], now=100.0, quiet_period_s=30)
    store.sync([StudyProgress(S1, 120.0)], now=125.0, quiet_period_s=30)
    (job,) = store.jobs(study_uid=S1)
    assert job.state == RECEIVED and job.received_through == 120.0
    store.sync([StudyProgress(S1, 120.0)], now=150.0, quiet_period_s=30)
    assert store.get(job.id).state == READY
    store.sync([StudyProgress(S1, 151.0)], now=152.0, quiet_period_s=30)
    assert store.get(job.id).state == RECEIVED
    assert "reopened" in store.get(job.id).reason
    assert len(store.jobs(study_uid=S1)) == 1


def test_instances_after_processing_create_a_new_job(store: JobStore) -> None:
    store.sync([StudyProgress(S1, 100.0)], now=200.0, quiet_period_s=30)
    job = store.claim_next(now=201.0)
    assert job is not None and job.state == RUNNING and job.attempts == 1
    store.finish(job.id, DONE, "ok", timings_s={"select": 0.1}, now=210.0)
    store.sync([StudyProgress(S1, 300.0)], now=301.0, quiet_period_s=30)
    jobs = store.jobs(study_uid=S1)
    assert [j.state for j in jobs] == [RECEIVED, DONE]
    assert f"after job {job.id}" in jobs[0].reason
    assert store.get(job.id).timings_s == {"select": 0.1}


def test_claim_is_exclusive_and_skips_studies_already_running(store: JobStore) -> None:
    store.sync([StudyProgress(S1, 1.0), StudyProgress("1.2.3.5", 2.0)], now=100.0, quiet_period_s=1)
    a = store.claim_next(now=100.0)
    b = store.claim_next(now=100.0)
    assert a is not None and b is not None and a.study_uid != b.study_uid
    assert store.claim_next(now=100.0) is None


def test_recover_puts_running_jobs_back_to_ready_and_logs_events(database: Path | str) -> None:
    db = database
    s = JobStore(db)
    s.sync([StudyProgress(S1, 1.0)], now=100.0, quiet_period_s=1)
    job = s.claim_next(now=100.0)
    assert job is not None
    s.close()  # a crash: the job stays running on disk
    s2 = JobStore(db)
    assert s2.get(job.id).state == RUNNING
    assert s2.recover(now=200.0) == [job.id]
    assert s2.get(job.id).state == READY
    assert [e.to_state for e in s2.events(job.id)] == [RECEIVED, READY, RUNNING, READY]
    again = s2.claim_next(now=201.0)
    assert again is not None and again.id == job.id and again.attempts == 2
    s2.finish(job.id, DECLINED, "gantry tilt 18.5 degrees", now=202.0)
    assert s2.get(job.id).reason == "gantry tilt 18.5 degrees"
    s2.close()


def test_impossible_transitions_are_refused_with_a_clear_message(store: JobStore) -> None:
    store.sync([StudyProgress(S1, 1.0)], now=100.0, quiet_period_s=1)
    (job,) = store.jobs(study_uid=S1)
    with pytest.raises(JobStoreError, match="expected state 'running', found 'ready'"):
        store.finish(job.id, DONE, "x")
    with pytest.raises(JobStoreError, match="must be one of"):
        store.finish(job.id, READY, "x")
    claimed = store.claim_next()
    assert claimed is not None
    store.finish(claimed.id, FAILED, "boom")
    store.retry(claimed.id)
    assert store.get(claimed.id).state == READY
    assert store.counts() == {READY: 1}


def test_after_a_restart_the_quiet_period_counts_only_time_the_node_ran(store: JobStore) -> None:
    """Issue 25: a partial study was declined 0.2 s after a restart because the downtime counted."""
    store.sync([StudyProgress(S1, 100.0)], now=101.0, quiet_period_s=30)
    # the node was down from 105 to 1000; the sender had not finished the study
    assert store.sync([StudyProgress(S1, 100.0)], now=1000.2, quiet_period_s=30, started_at=1000.0) == []
    assert store.sync([StudyProgress(S1, 100.0)], now=1029.9, quiet_period_s=30, started_at=1000.0) == []
    [job_id] = store.sync([StudyProgress(S1, 100.0)], now=1030.0, quiet_period_s=30, started_at=1000.0)
    assert store.get(job_id).reason == "no instance for 30 s since the node started"
    # a study that arrives while the node runs is quiet after the period as before
    S2 = "1.2.3.5"
    store.sync([StudyProgress(S2, 1100.0)], now=1100.0, quiet_period_s=30, started_at=1000.0)
    assert store.sync([StudyProgress(S2, 1100.0)], now=1130.0, quiet_period_s=30, started_at=1000.0) != []


def test_a_job_that_keeps_killing_the_node_is_failed_after_max_attempts(database: Path | str) -> None:
    db = database
    store = JobStore(db)
    store.sync([StudyProgress(S1, 100.0)], now=100.0, quiet_period_s=0)
    store.sync([StudyProgress(S1, 100.0)], now=101.0, quiet_period_s=0)
    job = store.claim_next(now=102.0)
    assert job is not None and job.attempts == 1
    store.close()  # the process died while the job ran: claim_next had committed attempts = 1
    for restart in range(2, 4):
        store = JobStore(db)
        assert store.recover(now=100.0 + restart, max_attempts=3) == [job.id]
        claimed = store.claim_next(now=100.5 + restart)
        assert claimed is not None and claimed.attempts == restart
        store.close()
    store = JobStore(db)
    assert store.recover(now=200.0, max_attempts=3) == []
    failed = store.get(job.id)
    assert failed.state == FAILED
    assert failed.reason.startswith("crashed the node 3 times") and "max_job_attempts 3" in failed.reason
    assert store.claim_next(now=201.0) is None
    store.retry(job.id, now=202.0)  # the operator may try once more
    assert store.claim_next(now=203.0).attempts == 4  # type: ignore[union-attr]
    store.close()
