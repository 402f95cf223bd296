"""The backfill driver (thighnode.backfill) against a fake archive and the real job store: every study
accounted for, at most ``in_flight`` at once, resumable without redoing, reasons recorded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from scp.errors import QueryFailedError
from scp.query import SeriesMatch, StudyMatch
from thighnode.backfill import (
    DECLINED, DONE, FAILED, PENDING, RETRIEVED, Backfill, BackfillCriteria, BackfillProgress, BackfillStore,
)
from thighnode.jobs import JobStore, StudyProgress

CRITERIA = BackfillCriteria(date_from="20150101", date_to="20241231", body_parts=("HIP", "LEG"))


def _study(i: int) -> StudyMatch:
    return StudyMatch(f"1.2.3.{i}", f"2016{i:04d}"[:8], "", "CT HIP", ("CT",), "", 1)


def _series(uid: str, body: str = "HIP", n: int = 100, desc: str = "axial") -> list[SeriesMatch]:
    return [SeriesMatch(uid + ".1", "CT", 1, desc, n, body), SeriesMatch(uid + ".9", "CT", 9, "Dose report", 1, body)]


class FakeArchiveAndNode:
    """The PACS (studies, series, retrieval) and the node (a job per retrieved study, ended on the next tick)."""

    def __init__(self, jobs: JobStore, studies: list[StudyMatch], series: dict[str, list[SeriesMatch]],
                 outcome: dict[str, str] | None = None, fail_retrieve: set[str] | None = None) -> None:
        self.jobs, self.studies, self.series = jobs, studies, series
        self.outcome = outcome or {}
        self.fail_retrieve = fail_retrieve or set()
        self.retrieved: list[str] = []
        self.arrived: list[str] = []
        self.max_in_flight = 0
        self.t = 1000.0

    def find_studies(self, criteria: BackfillCriteria) -> list[StudyMatch]:
        return [s for s in self.studies if criteria.date_from <= s.study_date <= criteria.date_to]

    def find_series(self, uid: str) -> list[SeriesMatch]:
        if uid == "1.2.3.666":
            raise QueryFailedError("C-FIND SERIES failed: association rejected")
        return self.series.get(uid, _series(uid))

    def retrieve(self, uid: str, series_uids: tuple[str, ...]) -> str:
        assert series_uids and all(not u.endswith(".9") for u in series_uids)  # never the dose report
        if uid in self.fail_retrieve:
            return "C-MOVE refused: 0xA801 move destination unknown"
        self.retrieved.append(uid)
        self.arrived.append(uid)
        return ""

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        """One node tick: studies that arrived become jobs, and jobs end."""
        self.t += s
        self.max_in_flight = max(self.max_in_flight, len(self.arrived))
        for uid in self.arrived:
            self.jobs.sync([StudyProgress(uid, self.t)], now=self.t, quiet_period_s=0.0)
        self.jobs.sync([], now=self.t + 1, quiet_period_s=0.0)
        while (job := self.jobs.claim_next(now=self.t)) is not None:
            state, reason = self.outcome.get(job.study_uid, (DONE, "SEG+SR+PDF processed"))
            self.jobs.finish(job.id, state, reason, now=self.t)
        self.arrived = []


@pytest.fixture()
def stores(database: Path | str):  # noqa: ANN201
    db = database
    store, jobs = BackfillStore(db), JobStore(db)
    yield store, jobs
    store.close()
    jobs.close()


def _backfill(store: BackfillStore, jobs: JobStore, fake: FakeArchiveAndNode, **kw) -> Backfill:  # noqa: ANN003
    return Backfill(store, jobs, find_studies=fake.find_studies, find_series=fake.find_series, retrieve=fake.retrieve,
                    min_slices=20, clock=fake.clock, sleep=fake.sleep, **kw)


def test_every_study_is_accounted_for_with_its_reason(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    studies = [_study(i) for i in range(1, 9)] + [_study(666)]
    series = {
        "1.2.3.3": _series("1.2.3.3", body="ABDOMEN"),  # declined before retrieval: wrong body part
        "1.2.3.4": _series("1.2.3.4", n=3),  # too few slices
    }
    outcome = {"1.2.3.5": ("declined", "not a CT of the hips or thighs: field of view is the abdomen"),
               "1.2.3.6": ("failed", "cannot decode the pixel data")}
    fake = FakeArchiveAndNode(jobs, studies, series, outcome, fail_retrieve={"1.2.3.7"})
    reports: list[BackfillProgress] = []
    bf = _backfill(store, jobs, fake, report=reports.append, retrieve_attempts=2)
    assert bf.query(CRITERIA, no_send=True) == (9, 9)
    final = bf.run(CRITERIA, in_flight=2, poll_s=1.0)

    rows = {s.study_uid: s for s in store.studies()}
    assert len(rows) == 9 and final.total == 9 and final.pending == 0 and final.in_flight == 0
    assert {u for u, s in rows.items() if s.state == DONE} == {"1.2.3.1", "1.2.3.2", "1.2.3.8"}
    assert rows["1.2.3.3"].state == DECLINED and "body part HIP, LEG (the study's: ABDOMEN)" in rows["1.2.3.3"].reason
    assert rows["1.2.3.4"].state == DECLINED and ">= 20 instances" in rows["1.2.3.4"].reason
    assert rows["1.2.3.5"].state == DECLINED and "field of view is the abdomen" in rows["1.2.3.5"].reason
    assert rows["1.2.3.6"].state == FAILED and "cannot decode" in rows["1.2.3.6"].reason
    assert rows["1.2.3.7"].state == FAILED and "0xA801" in rows["1.2.3.7"].reason and rows["1.2.3.7"].attempts == 2
    assert rows["1.2.3.666"].state == FAILED and "series query failed" in rows["1.2.3.666"].reason
    assert all(rows[u].job_id is not None for u in ("1.2.3.1", "1.2.3.5", "1.2.3.6"))
    assert (final.done, final.declined, final.failed) == (3, 3, 3)
    assert fake.max_in_flight <= 2
    assert reports and reports[-1].in_flight == 0 and final.rate_per_h is not None and final.rate_per_h > 0
    assert "9/9 ended: 3 done, 3 declined, 3 failed" in final.line()
    assert store.holds_outputs("1.2.3.1") and not store.holds_outputs("9.9.9")


def test_a_stopped_run_resumes_without_redoing_finished_studies(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    fake = FakeArchiveAndNode(jobs, [_study(i) for i in range(1, 7)], {})
    bf = _backfill(store, jobs, fake)
    bf.query(CRITERIA, no_send=False)
    first = bf.run(CRITERIA, in_flight=2, max_studies=3, poll_s=1.0)
    assert first.done == 3 and first.pending == 3 and len(fake.retrieved) == 3
    # a new run (the same command again): the query finds nothing new, the rest is done once
    again = _backfill(store, jobs, fake)
    assert again.query(CRITERIA, no_send=False) == (6, 0)
    final = again.run(CRITERIA, in_flight=2, poll_s=1.0)
    assert final.done == 6 and sorted(fake.retrieved) == sorted(s.study_instance_uid for s in fake.studies)
    assert all(len(jobs.jobs(study_uid=s.study_instance_uid)) == 1 for s in fake.studies)
    assert not store.holds_outputs("1.2.3.1")


def test_a_study_already_processed_by_the_node_is_not_retrieved_again(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    fake = FakeArchiveAndNode(jobs, [_study(1), _study(2)], {})
    fake.arrived = ["1.2.3.1"]  # a scanner sent it earlier
    fake.sleep(1.0)
    bf = _backfill(store, jobs, fake)
    bf.query(CRITERIA, no_send=True)
    bf.run(CRITERIA, poll_s=1.0)
    assert fake.retrieved == ["1.2.3.2"]
    assert store.get("1.2.3.1").state == DONE and "already processed by the node" in store.get("1.2.3.1").reason


def test_stop_event_leaves_retrieved_studies_to_the_next_run(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    fake = FakeArchiveAndNode(jobs, [_study(i) for i in range(1, 4)], {})
    stop = threading.Event()

    def retrieve_then_stop(uid: str, series: tuple[str, ...]) -> str:
        stop.set()  # Ctrl-C right after the first retrieval
        return fake.retrieve(uid, series)

    bf = Backfill(store, jobs, find_studies=fake.find_studies, find_series=fake.find_series,
                  retrieve=retrieve_then_stop, clock=fake.clock, sleep=fake.sleep)
    bf.query(CRITERIA, no_send=True)
    bf.run(CRITERIA, stop=stop, poll_s=1.0)
    assert store.counts() == {RETRIEVED: 1, PENDING: 2}
    fake.sleep(1.0)  # the node finishes it meanwhile
    final = _backfill(store, jobs, fake).run(CRITERIA, poll_s=1.0)
    assert final.done == 3 and len(fake.retrieved) == 3


def test_a_retrieved_study_that_never_arrives_fails_with_the_likely_cause(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    fake = FakeArchiveAndNode(jobs, [_study(1)], {})
    fake.retrieve = lambda uid, series: ""  # type: ignore[method-assign]  # the PACS says success, nothing comes
    bf = _backfill(store, jobs, fake, arrival_timeout_s=30.0)
    bf.query(CRITERIA, no_send=True)
    final = bf.run(CRITERIA, poll_s=10.0)
    row = store.get("1.2.3.1")
    assert final.failed == 1 and row.state == FAILED and "no job started within 30 s" in row.reason


def test_retry_failed_takes_failed_studies_again(stores) -> None:  # noqa: ANN001
    store, jobs = stores
    fake = FakeArchiveAndNode(jobs, [_study(1)], {}, fail_retrieve={"1.2.3.1"})
    bf = _backfill(store, jobs, fake, retrieve_attempts=1)
    bf.query(CRITERIA, no_send=True)
    assert bf.run(CRITERIA, poll_s=1.0).failed == 1
    fake.fail_retrieve = set()
    assert bf.run(CRITERIA, poll_s=1.0).failed == 1  # without --retry-failed: left alone
    assert bf.run(CRITERIA, poll_s=1.0, retry_failed=True).done == 1
