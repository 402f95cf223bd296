"""Unit tests of the persistent outbox (no network)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dicomout.errors import OutputError
from dicomout.outbox import (
    STATE_FAILED,
    STATE_PENDING,
    STATE_SENT,
    Outbox,
    RetryPolicy,
    send_pending,
)
from dicomout.sender import Destination

T0 = 1_700_000_000.0
CT = "1.2.840.10008.5.1.4.1.1.2"


def _enqueue(outbox: Outbox, n: int = 1, *, destination: str = "PACS", study: str = "1.2.3", now: float = T0) -> list[int]:
    return [
        outbox.enqueue(
            Path(f"/data/out/{i}.dcm"),
            destination,
            job_id=7,
            study_uid=study,
            sop_class_uid=CT,
            sop_instance_uid=f"{study}.{i}",
            now=now,
        )
        for i in range(n)
    ]


def test_enqueue_creates_pending_item_due_now(database: Path | str) -> None:
    outbox = Outbox(database)
    (item_id,) = _enqueue(outbox)
    item = outbox.get(item_id)
    assert item is not None
    assert (item.state, item.attempts, item.destination, item.job_id) == (STATE_PENDING, 0, "PACS", 7)
    assert item.path == Path("/data/out/0.dcm")
    assert item.study_instance_uid == "1.2.3" and item.sop_instance_uid == "1.2.3.0"
    assert item.created_at == T0 and item.next_attempt_at == T0
    assert [i.id for i in outbox.due(T0)] == [item_id]
    assert outbox.due(T0 - 1) == []


def test_enqueue_is_idempotent_and_requeues_with_new_path(database: Path | str) -> None:
    outbox = Outbox(database)
    (item_id,) = _enqueue(outbox)
    item = outbox.due(T0)[0]
    outbox.mark_sent(item, 0, T0 + 1)
    again = outbox.enqueue(
        Path("/data/out/reprocessed.dcm"), "PACS", job_id=8, study_uid="1.2.3",
        sop_class_uid=CT, sop_instance_uid="1.2.3.0", now=T0 + 100,
    )
    assert again == item_id
    items = outbox.items()
    assert len(items) == 1
    (requeued,) = items
    assert requeued.state == STATE_PENDING and requeued.attempts == 0 and requeued.sent_at is None
    assert requeued.path == Path("/data/out/reprocessed.dcm") and requeued.job_id == 8
    assert requeued.created_at == T0 + 100 and requeued.generation == item.generation + 1
    # the same object for another destination is another item
    other = outbox.enqueue(Path("/x.dcm"), "VIEWER", job_id=8, study_uid="1.2.3", sop_class_uid=CT,
                           sop_instance_uid="1.2.3.0", now=T0)
    assert other != item_id and outbox.counts() == {STATE_PENDING: 2, STATE_SENT: 0, STATE_FAILED: 0}


def test_outcome_of_a_send_racing_a_requeue_is_not_recorded(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox)
    stale = outbox.due(T0)[0]
    _enqueue(outbox, now=T0 + 5)  # reprocessing while the old file was on the wire
    assert outbox.mark_sent(stale, 0, T0 + 6) is None
    assert outbox.items()[0].state == STATE_PENDING


def test_backoff_schedule_doubles_and_is_capped(database: Path | str) -> None:
    policy = RetryPolicy(base_delay_s=10.0, max_delay_s=60.0, max_attempts=50, max_age_s=1e9)
    outbox = Outbox(database, policy)
    _enqueue(outbox)
    now = T0
    delays = []
    for _ in range(6):
        (item,) = outbox.due(now)
        updated = outbox.mark_retry(item, "connection refused", None, now)
        assert updated is not None and updated.state == STATE_PENDING
        delays.append(updated.next_attempt_at - now)
        assert outbox.due(updated.next_attempt_at - 0.5) == []
        now = updated.next_attempt_at
    assert delays == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    final = outbox.items()[0]
    assert final.attempts == 6 and final.last_error == "connection refused" and final.last_status is None


def test_default_policy_is_10_s_doubling_capped_at_one_hour() -> None:
    policy = RetryPolicy()
    assert [policy.delay_s(n) for n in (1, 2, 3, 9, 10, 200)] == [10.0, 20.0, 40.0, 2560.0, 3600.0, 3600.0]


def test_gives_up_after_max_attempts(database: Path | str) -> None:
    outbox = Outbox(database, RetryPolicy(max_attempts=3))
    _enqueue(outbox)
    now = T0
    states = []
    for _ in range(3):
        (item,) = outbox.due(now)
        updated = outbox.mark_retry(item, "association rejected", 0xA700, now)
        assert updated is not None
        states.append(updated.state)
        now = updated.next_attempt_at
    assert states == [STATE_PENDING, STATE_PENDING, STATE_FAILED]
    failed = outbox.items()[0]
    assert failed.attempts == 3 and failed.last_status == 0xA700
    assert "association rejected" in failed.last_error and "3 attempts" in failed.last_error
    assert outbox.due(now + 1e6) == []


def test_gives_up_after_max_age(database: Path | str) -> None:
    outbox = Outbox(database, RetryPolicy(max_age_s=3600.0))
    _enqueue(outbox)
    (item,) = outbox.due(T0)
    assert outbox.mark_retry(item, "refused", None, T0 + 10).state == STATE_PENDING  # type: ignore[union-attr]
    (item,) = outbox.due(T0 + 3600)
    updated = outbox.mark_retry(item, "refused", None, T0 + 3600)
    assert updated is not None and updated.state == STATE_FAILED and "max_age_s" in updated.last_error


def test_permanent_error_fails_at_once(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox)
    (item,) = outbox.due(T0)
    updated = outbox.mark_retry(item, "refused SOP class", None, T0, permanent=True)
    assert updated is not None
    assert (updated.state, updated.attempts, updated.last_error) == (STATE_FAILED, 1, "refused SOP class")
    assert outbox.counts() == {STATE_PENDING: 0, STATE_SENT: 0, STATE_FAILED: 1}


def test_restart_on_the_same_db_resumes_pending_items(database: Path | str) -> None:
    db = database
    first = Outbox(db)
    ids = _enqueue(first, 3)
    first.mark_sent(first.due(T0)[0], 0, T0)
    first.mark_retry(first.due(T0)[0], "connection refused", None, T0)
    del first  # "crash"
    second = Outbox(db)
    assert second.counts() == {STATE_PENDING: 2, STATE_SENT: 1, STATE_FAILED: 0}
    assert [i.id for i in second.due(T0)] == [ids[2]]
    assert [i.id for i in second.due(T0 + 10)] == ids[1:]
    assert second.items()[1].attempts == 1


def test_items_by_study_and_counts(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox, 2, study="1.2.3")
    _enqueue(outbox, 3, study="1.2.4")
    assert len(outbox.items()) == 5
    assert {i.sop_instance_uid for i in outbox.items("1.2.4")} == {"1.2.4.0", "1.2.4.1", "1.2.4.2"}
    assert outbox.items("9.9") == []
    outbox.mark_sent(outbox.items("1.2.3")[0], 0, T0)
    assert outbox.counts() == {STATE_PENDING: 4, STATE_SENT: 1, STATE_FAILED: 0}


def test_shares_the_db_file_with_other_tables_and_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT)")
        conn.execute("INSERT INTO jobs (state) VALUES ('done')")
    outbox = Outbox(db)
    _enqueue(outbox)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT state FROM jobs").fetchall() == [("done",)]


def test_enqueue_rejects_blank_uids(database: Path | str) -> None:
    outbox = Outbox(database)
    with pytest.raises(OutputError, match="sop_instance_uid is '' "):
        outbox.enqueue(Path("/x.dcm"), "PACS", job_id=1, study_uid="1.2", sop_class_uid=CT, sop_instance_uid="")


def test_retry_policy_validation() -> None:
    with pytest.raises(OutputError, match="max_attempts is -1"):
        RetryPolicy(max_attempts=-1)
    with pytest.raises(OutputError, match="max_delay_s 5.0 is below base_delay_s 10.0"):
        RetryPolicy(max_delay_s=5.0)


def test_concurrent_enqueues_from_threads(database: Path | str) -> None:
    outbox = Outbox(database)

    def worker(w: int) -> None:
        for i in range(20):
            outbox.enqueue(Path(f"/{w}/{i}.dcm"), "PACS", job_id=w, study_uid="1.2",
                           sop_class_uid=CT, sop_instance_uid=f"1.2.{i}", now=T0)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outbox.counts()[STATE_PENDING] == 20  # same 20 objects, re-queued, never duplicated


def test_send_pending_fails_items_of_unconfigured_destination(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox, 2, destination="OLDPACS")
    configured = {"PACS": Destination("PACS", "PACS", "127.0.0.1", 4242)}
    assert send_pending(outbox, configured, now=T0) == 0
    items = outbox.items()
    assert [i.state for i in items] == [STATE_FAILED, STATE_FAILED]
    assert items[0].last_error == "destination 'OLDPACS' is no longer configured (configured: PACS)"


def test_send_pending_with_nothing_due_sends_nothing(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox, now=T0 + 60)
    assert send_pending(outbox, {}, now=T0) == 0
    assert outbox.counts()[STATE_PENDING] == 1


def test_send_pending_fails_unreadable_file_permanently(tmp_path: Path, database: Path | str) -> None:
    outbox = Outbox(database)
    outbox.enqueue(tmp_path / "gone.dcm", "PACS", job_id=1, study_uid="1.2", sop_class_uid=CT,
                   sop_instance_uid="1.2.3", now=T0)
    # no server listens: the file is checked before any association is opened
    assert send_pending(outbox, {"PACS": Destination("PACS", "PACS", "127.0.0.1", 9)}, now=T0) == 0
    (item,) = outbox.items()
    assert item.state == STATE_FAILED and "cannot read" in item.last_error and "gone.dcm" in item.last_error


def test_items_carry_their_transport_kind_default_cstore(database: Path | str) -> None:
    outbox = Outbox(database)
    (first,) = _enqueue(outbox)
    other = outbox.enqueue(Path("/data/out/x.dcm"), "ARCHIVE", job_id=7, study_uid="1.2.3", sop_class_uid=CT,
                           sop_instance_uid="1.2.3.9", now=T0, transport="https")
    assert outbox.get(first).transport == "cstore"
    assert outbox.get(other).transport == "https"
    with pytest.raises(OutputError, match="transport is ''"):
        outbox.enqueue(Path("/x.dcm"), "PACS", job_id=7, study_uid="1.2.3", sop_class_uid=CT, sop_instance_uid="1.2.4",
                       transport="")


def test_a_database_without_the_transport_column_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:  # the outbox table as it was before transports
        conn.executescript(
            """
            CREATE TABLE outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL, path TEXT NOT NULL,
                sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL,
                job_id INTEGER, state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
                attempts INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 1,
                created_at REAL NOT NULL, next_attempt_at REAL NOT NULL, last_status INTEGER,
                last_error TEXT NOT NULL DEFAULT '', sent_at REAL, UNIQUE (destination, sop_instance_uid));
            INSERT INTO outbox (destination, path, sop_class_uid, sop_instance_uid, study_instance_uid, job_id,
                                state, created_at, next_attempt_at)
                VALUES ('PACS', '/data/out/0.dcm', '1.2.840.10008.5.1.4.1.1.2', '1.2.3.0', '1.2.3', 7, 'pending', 1, 1);
            """
        )
    conn.close()
    outbox = Outbox(db)
    (item,) = outbox.items()
    assert (item.sop_instance_uid, item.transport, item.state) == ("1.2.3.0", "cstore", STATE_PENDING)
    assert item.transfer_syntax_uid == ""  # not known for items of an older database
    Outbox(db)  # a second start finds the columns and leaves them
    sent = outbox.mark_sent(item, 0, transfer_syntax_uid="1.2.840.10008.1.2.1.99")
    assert sent is not None and sent.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    # Re-queued (reprocessing): the syntax of the earlier send no longer describes it.
    outbox.enqueue(Path("/data/out/0.dcm"), "PACS", job_id=8, study_uid="1.2.3",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.0")
    (again,) = outbox.items()
    assert (again.state, again.transfer_syntax_uid) == (STATE_PENDING, "")


class _Recorder:
    """A non-DICOM transport: records what it was given and stores everything."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Path], object]] = []

    def send(self, paths, destination):  # noqa: ANN001, ANN201
        from dicomout.sender import SendResult

        self.calls.append((list(paths), destination))
        return [SendResult(p, "", "", None, True) for p in paths]


def test_send_pending_dispatches_each_item_to_its_transport(database: Path | str) -> None:
    outbox = Outbox(database)
    (cstore_item,) = _enqueue(outbox)
    web = outbox.enqueue(Path("/data/out/w.dcm"), "PACS", job_id=7, study_uid="1.2.3", sop_class_uid=CT,
                         sop_instance_uid="1.2.3.w", now=T0, transport="web")
    lost = outbox.enqueue(Path("/data/out/l.dcm"), "PACS", job_id=7, study_uid="1.2.3", sop_class_uid=CT,
                          sop_instance_uid="1.2.3.l", now=T0, transport="carrier-pigeon")
    recorder, cstore = _Recorder(), _Recorder()
    destination = Destination("PACS", "PACS", "127.0.0.1", 9)
    stored = send_pending(outbox, {"PACS": destination}, now=T0, transports={"cstore": cstore, "web": recorder})
    assert stored == 2
    assert recorder.calls == [([Path("/data/out/w.dcm")], destination)]
    assert cstore.calls == [([Path("/data/out/0.dcm")], destination)]
    assert outbox.get(web).state == STATE_SENT and outbox.get(cstore_item).state == STATE_SENT
    failed = outbox.get(lost)
    assert failed.state == STATE_FAILED
    assert failed.last_error == "transport 'carrier-pigeon' of 'PACS' is not available (available: cstore, web)"


class _StoresAllBut:
    """A transport that stores every file except those named in ``refuse`` (permanent refusal)."""

    def __init__(self, refuse: set[Path]) -> None:
        self.refuse = refuse

    def send(self, paths, destination):  # noqa: ANN001, ANN201
        from dicomout.sender import SendResult

        return [SendResult(p, "", "", 0xA900 if p in self.refuse else 0, p not in self.refuse,
                           "refused" if p in self.refuse else "", permanent=p in self.refuse) for p in paths]


def test_on_sent_hears_of_the_confirmed_objects_only_once_per_batch(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox, 3, study="1.2.3")
    _enqueue(outbox, 1, study="1.2.4")
    heard: list[tuple[str, list[str]]] = []
    destination = Destination("PACS", "PACS", "127.0.0.1", 9)
    stored = send_pending(
        outbox, {"PACS": destination}, now=T0, transports={"cstore": _StoresAllBut({Path("/data/out/1.dcm")})},
        on_sent=lambda dest, items: heard.append((dest.name, [i.sop_instance_uid for i in items])),
    )
    assert stored == 3
    assert heard == [("PACS", ["1.2.3.0", "1.2.3.2", "1.2.4.0"])]
    assert send_pending(outbox, {"PACS": destination}, now=T0 + 1, on_sent=lambda d, i: heard.append(("again", []))) == 0
    assert len(heard) == 1  # nothing more was sent, nothing more heard


def test_a_failing_on_sent_listener_leaves_the_items_sent(database: Path | str) -> None:
    outbox = Outbox(database)
    (item_id,) = _enqueue(outbox)

    def broken(dest: Destination, items: tuple[object, ...]) -> None:
        raise RuntimeError("listener broken")

    stored = send_pending(outbox, {"PACS": Destination("PACS", "PACS", "127.0.0.1", 9)}, now=T0,
                          transports={"cstore": _StoresAllBut(set())}, on_sent=broken)
    assert stored == 1 and outbox.get(item_id).state == STATE_SENT


def test_backlog_counts_pending_items_per_destination_with_the_oldest(database: Path | str) -> None:
    outbox = Outbox(database)
    _enqueue(outbox, 2, destination="PACS", now=T0 + 5)
    _enqueue(outbox, 1, destination="VNA", study="1.2.9", now=T0)
    sent_id = _enqueue(outbox, 1, destination="VNA", study="1.2.8", now=T0 - 100)[0]
    outbox.mark_sent(outbox.get(sent_id), 0, T0)
    assert [(b.destination, b.pending, b.oldest_created_at) for b in outbox.backlog()] == [
        ("PACS", 2, T0 + 5), ("VNA", 1, T0)]
def test_default_policy_counts_no_attempts_only_the_age(database: Path | str) -> None:
    """Issue 25: with the old default (a count) a PACS outage of ~11 h failed every item for good;
    now an item keeps being retried (backoff capped at max_delay_s) until max_age_s."""
    policy = RetryPolicy()
    assert policy.max_attempts == 0
    outbox = Outbox(database, policy)
    _enqueue(outbox)
    now = T0
    for _ in range(200):  # 200 attempts over ~8 days of backoff would pass the age: stop before it
        (item,) = outbox.due(now)
        if now - T0 + policy.max_delay_s >= policy.max_age_s:
            break
        updated = outbox.mark_retry(item, "association rejected", None, now)
        assert updated is not None and updated.state == STATE_PENDING
        assert updated.next_attempt_at - now <= policy.max_delay_s
        now = updated.next_attempt_at
    assert now - T0 > 2 * 24 * 3600  # still pending after two days of outage, well past 20 attempts
    (item,) = outbox.due(T0 + policy.max_age_s)
    final = outbox.mark_retry(item, "association rejected", None, T0 + policy.max_age_s)
    assert final is not None and final.state == STATE_FAILED and "max_age_s" in final.last_error


def _fail(outbox: Outbox, item_id: int, now: float = T0) -> None:
    item = outbox.get(item_id)
    assert item is not None
    outbox.mark_retry(item, "refused", None, now, permanent=True)


def test_resend_requeues_failed_items_by_item_job_or_destination_once(database: Path | str) -> None:
    outbox = Outbox(database)
    a, b = _enqueue(outbox, 2)
    (c,) = _enqueue(outbox, 1, destination="ARCHIVE", study="1.2.4")
    for item_id in (a, b, c):
        _fail(outbox, item_id)
    [again] = outbox.resend(item_id=a, now=T0 + 100)
    assert (again.id, again.state, again.attempts, again.generation) == (a, STATE_PENDING, 0, 2)
    assert again.created_at == T0 + 100 and again.last_error == "" and again.sop_instance_uid == "1.2.3.0"
    assert outbox.resend(item_id=a, now=T0 + 101) == []  # already pending: asking twice sends once
    assert [i.id for i in outbox.resend(destination="PACS", failed_only=True, now=T0 + 102)] == [b]
    assert [i.id for i in outbox.resend(job_id=7, now=T0 + 103)] == [c]
    assert [i.id for i in outbox.due(T0 + 103)] == [a, b, c]
    assert outbox.counts() == {STATE_PENDING: 3, STATE_SENT: 0, STATE_FAILED: 0}


def test_resend_of_a_sent_item_and_its_errors(database: Path | str) -> None:
    outbox = Outbox(database)
    (a,) = _enqueue(outbox)
    outbox.mark_sent(outbox.get(a), 0, T0 + 1)  # type: ignore[arg-type]
    assert outbox.resend(destination="PACS", failed_only=True) == []  # only failed ones
    [again] = outbox.resend(item_id=a, now=T0 + 5)
    assert again.state == STATE_PENDING and again.sent_at is None
    with pytest.raises(OutputError, match="there is no outbox item 99"):
        outbox.resend(item_id=99)
    with pytest.raises(OutputError, match="selectors given: none"):
        outbox.resend()
    with pytest.raises(OutputError, match="selectors given: item, job"):
        outbox.resend(item_id=a, job_id=7)
