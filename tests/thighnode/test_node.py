"""thighnode.node: the retention purge decides; scp removes the study's files and index rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scp.index import InstanceIndex
from scp.spool import write_instance
from scp.types import ReceivedInstance
from thighnode.jobs import DONE, JobStore, StudyProgress
from thighnode.node import Node
from thighnode.settings import load_settings

DAY_S = 86400.0
OLD, BUSY, RECENT = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"


def _receive(node: Node, study_uid: str, at: float) -> Path:
    assert node.index is not None
    path = write_instance(node.settings.spool_dir, study_uid, f"{study_uid}.1", f"{study_uid}.1.1", b"dicom")
    node.index.record(
        ReceivedInstance(
            sop_instance_uid=f"{study_uid}.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study_uid,
            series_instance_uid=f"{study_uid}.1",
            modality="CT",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=path,
            size_bytes=5,
            calling_ae="CT",
            peer_address="127.0.0.1",
            received_at=at,
        )
    )
    return path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    node = Node(settings, load_model=False)
    node.index = InstanceIndex(settings.db_path)
    node.jobs = JobStore(settings.db_path)
    yield node
    node.index.close()
    node.jobs.close()


def test_purge_removes_only_idle_studies_whose_jobs_are_final(node: Node) -> None:
    assert node.index is not None and node.jobs is not None
    keep_s = node.settings.retention.keep_received_days * DAY_S
    now = 1_000.0 * DAY_S
    old = _receive(node, OLD, now - keep_s - 10)
    busy = _receive(node, BUSY, now - keep_s - 5)
    recent = _receive(node, RECENT, now - keep_s + 60)
    node.jobs.sync([StudyProgress(OLD, now - keep_s - 10)], now=now - keep_s, quiet_period_s=0)
    job = node.jobs.claim_next(now=now - keep_s)
    assert job is not None and job.study_uid == OLD
    node.jobs.finish(job.id, DONE, "ok", now=now - keep_s)
    node.jobs.sync([StudyProgress(BUSY, now - keep_s - 5)], now=now - keep_s, quiet_period_s=1e9)

    assert node.purge(now=now) == 1
    assert not old.exists() and not (node.settings.spool_dir / OLD).exists()
    assert busy.exists() and recent.exists()
    assert {a.study_instance_uid for a in node.index.activity()} == {BUSY, RECENT}


def test_purge_keeps_the_ground_truth_of_a_corrected_study(node: Node, tmp_path: Path) -> None:
    from pipeline.types import PatientInfo
    from thighnode.corrections import store_case

    assert node.jobs is not None
    keep_s = node.settings.retention.keep_received_days * DAY_S
    now = 1_000.0 * DAY_S
    ct = _receive(node, OLD, now - keep_s - 10)
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"seg")
    case = store_case(
        node.settings.node.data_dir, study_uid=OLD, series_uid=f"{OLD}.1", patient=PatientInfo(patient_id="P1"),
        seg_sop_instance_uid="1.2.3.4", observer="Reader^Test", received_at=now, ct_paths=[ct], seg_path=seg,
    )
    node.jobs.sync([StudyProgress(OLD, now - keep_s - 10)], now=now - keep_s, quiet_period_s=0)
    job = node.jobs.claim_next(now=now - keep_s)
    assert job is not None
    node.jobs.finish(job.id, DONE, "ok", now=now - keep_s)

    assert node.purge(now=now) == 1
    assert not ct.exists()
    assert (case / "ct" / ct.name).read_bytes() == b"dicom" and (case / "seg.dcm").read_bytes() == b"seg"
    assert (case / "case.json").is_file()


def test_a_node_whose_audit_trail_cannot_be_written_does_not_start(tmp_path: Path) -> None:
    from thighnode.node import NodeStartError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the audit folder should be")
    settings = load_settings(environ={"THIGHNODE_HOME": str(tmp_path),
                                      "THIGHNODE_AUDIT__FILE": str(blocker / "audit.log")})
    node = Node(settings, load_model=False)
    with pytest.raises(NodeStartError) as err:
        node.start()
    assert f"audit.file = '{blocker / 'audit.log'}': cannot be created or opened" in err.value.message
    # the data directory's lock was given back: a corrected node may take it
    import fcntl

    with open(settings.node.data_dir / "thighnode.lock", "a+", encoding="utf-8") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_send_asked_for_during_an_outbox_run_goes_round_once_more(node: Node, monkeypatch) -> None:
    """A job that queues its outputs while the outbox is sending wakes it: the run sends again at once
    instead of leaving the new items for the next send_interval_s."""
    import thighnode.node as node_module

    calls: list[int] = []

    def send_pending(outbox, destinations, on_sent=None) -> int:
        calls.append(len(calls))
        if len(calls) == 1:
            node.wake_outbox()  # a job finished during this send
        return 1

    monkeypatch.setattr(node_module, "send_pending", send_pending)
    node.outbox = object()  # type: ignore[assignment]
    assert node.send_outbox() == 2 and calls == [0, 1]
    assert node.send_outbox() == 1 and calls == [0, 1, 2]  # no wake: one pass


def test_a_done_job_wakes_the_outbox_before_its_interval(tmp_path: Path, monkeypatch) -> None:
    """The outbox runs every send_interval_s (10 s by default); a finished job's outputs go at once."""
    import threading

    import thighnode.node as node_module
    from tests.support.ports import free_port
    from thighnode.workflow import Outcome

    settings = load_settings(environ={
        "THIGHNODE_HOME": str(tmp_path), "THIGHNODE_NODE__HOST": "127.0.0.1",
        "THIGHNODE_NODE__PORT": str(free_port()), "THIGHNODE_OUTBOX__SEND_INTERVAL_S": "3600",
    })
    sent = threading.Event()
    monkeypatch.setattr(node_module, "send_pending", lambda *a, **k: sent.set() or 0)
    node = Node(settings, load_model=False)
    node.start()
    try:
        assert node.jobs is not None and node._workflow is not None
        monkeypatch.setattr(node._workflow, "run", lambda job: Outcome(DONE, "SEG queued to pacs"))
        node.jobs.sync([StudyProgress(OLD, 1.0)], now=10.0, quiet_period_s=0)
        job = node.jobs.claim_next()
        assert job is not None and not sent.is_set()
        node._busy += 1  # as tick() does before handing the job to a worker
        node._run_job(job)
        assert sent.wait(60), "the outbox was not run when the job ended"
        assert node.jobs.jobs(state=DONE)[0].id == job.id
    finally:
        node.stop()
