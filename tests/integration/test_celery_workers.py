"""Scale-out with Celery (issue 26): a real `thighnode serve` as the one scheduler ([compute] backend = "celery"),
a real RabbitMQ broker and two real worker processes, a real Orthanc as the PACS. Six studies are pushed; the
worker that takes the first task is killed with SIGKILL in the middle of it; the task is redelivered to the
other worker, every study ends done once, and the PACS receives each output object exactly once.

The workers' model is the phantoms' ground truth (tests/support/celery_worker.py), so the test measures the
wiring, not the model; a test-only delay ([compute] debug_task_delay_s) makes each task last long enough to be
killed in the middle deterministically."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.celery_worker import study_uid, write_studies
from tests.support.node import REPO_ROOT, NodeProcess
from tests.support.orthanc import OrthancServer
from tests.support.processes import stop_process_group
from tests.support.rabbitmq import RabbitMQServer

pytestmark = pytest.mark.integration

N_STUDIES = 6
DELAY_S = 3.0


class Worker:
    """tests/support/celery_worker.py as a process in its own session (so SIGKILL takes its pool process too)."""

    def __init__(self, node: NodeProcess, name: str) -> None:
        self.name = name
        self.log_path = node.tmp_path / f"{name.split('@')[0]}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "tests" / "support" / "celery_worker.py"), str(node.config), name],
                cwd=REPO_ROOT, env=node.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process_group(self.proc)


def _wait(predicate, timeout_s: float, what: str, logs) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; logs:\n{logs()}")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_studies(tmp_path_factory.mktemp("celery_ct"), N_STUDIES, "C")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    with RabbitMQServer(tmp_path_factory.mktemp("mq")) as mq:
        yield mq


def _push(port: int, files: list[Path]) -> None:
    done = subprocess.run([require_tool("storescu"), "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_the_thighnode_worker_command_takes_the_node_s_job(
    tmp_path: Path, studies: list[Path], broker: RabbitMQServer
) -> None:
    """`thighnode worker --no-model` (the real command line): the job ends after select and load."""
    extra = f'[compute]\nbackend = "celery"\nbroker_url = "{broker.url}"\nqueue = "thighnode.cli"\n'
    with NodeProcess(tmp_path / "node", quiet_period_s=3.0, extra_config=extra) as node:
        log_path = tmp_path / "worker.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "thighnode", "worker", "--config", str(node.config), "--no-model",
                 "--name", "cli@test"], cwd=REPO_ROOT, env=node.env(), stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            _push(node.port, [p for p in studies if p.parent.name == "0"])
            status = node.wait_for(
                lambda s: bool(s["jobs"]) and s["jobs"][0]["state"] in ("done", "declined", "failed"),
                timeout_s=300, what="the job done by the worker",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    worker_log = log_path.read_text(errors="replace")
    job = status["jobs"][0]
    assert (job["study_uid"], job["state"]) == (study_uid(0), "done"), job
    assert "segmentation is off" in job["reason"]
    assert f"job {job['job']}: task started on cli@test (first delivery" in worker_log, worker_log[-3000:]
    assert "model off" in worker_log


def test_six_studies_on_two_workers_one_killed_mid_task_each_output_reaches_the_pacs_once(
    tmp_path: Path, studies: list[Path], broker: RabbitMQServer
) -> None:
    mq = broker
    with OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        extra = (
            f'[compute]\nbackend = "celery"\nbroker_url = "{mq.url}"\nqueue = "thighnode.test"\n'
            f"debug_task_delay_s = {DELAY_S}\n\n"
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        )
        # a quiet period long enough that no study is split into two jobs on a loaded machine
        node = NodeProcess(tmp_path / "node", quiet_period_s=3.0, extra_config=extra).start()
        workers = [Worker(node, "w0@test"), Worker(node, "w1@test")]

        def logs() -> str:
            return "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in workers) + f"\n--- node\n{node.log()[-3000:]}"

        try:
            _wait(lambda: all("ready in" in w.log() for w in workers), 300, "both workers ready", logs)
            _push(node.port, studies)

            started = re.compile(r"job (\d+): task started on (\S+) \(first delivery")
            _wait(lambda: any(started.search(w.log()) for w in workers), 300, "a first task to start", logs)
            victim = next(w for w in workers if started.search(w.log()))
            killed_job = int(started.search(victim.log()).group(1))
            victim.kill9()  # within the test-only delay: the job is half done, its message unacknowledged
            assert f"job {killed_job}: task ended" not in victim.log()
            survivor = next(w for w in workers if w is not victim)

            status = node.wait_for(
                lambda s: len(s["jobs"]) == N_STUDIES and all(j["state"] in ("done", "declined", "failed") for j in s["jobs"])
                and s["outbox_counts"].get("pending", 0) == 0,
                timeout_s=900, what="all six studies processed and sent",
            )
        finally:
            for w in workers:
                w.stop()
            node.stop()

        jobs = status["jobs"]
        assert sorted(j["study_uid"] for j in jobs) == sorted(study_uid(i) for i in range(N_STUDIES))
        assert [j["state"] for j in jobs] == ["done"] * N_STUDIES, [(j["job"], j["state"], j["reason"]) for j in jobs]
        # The killed job: redelivered to the other worker, which ran and recorded it; nothing else moved it.
        assert re.search(rf"job {killed_job}: task started on {re.escape(survivor.name)} \(redelivered", survivor.log()), logs()
        assert f"job {killed_job}: task ended on {survivor.name}: done" in survivor.log()
        con = sqlite3.connect(node.data_dir / "thighnode.db")
        events = [r[0] for r in con.execute(
            "SELECT to_state FROM job_events WHERE job_id = ? ORDER BY id", (killed_job,)).fetchall()]
        outbox = con.execute("SELECT study_instance_uid, sop_instance_uid, state FROM outbox").fetchall()
        con.close()
        assert events == ["received", "ready", "running", "done"], events
        assert len(outbox) == 3 * N_STUDIES and {r[2] for r in outbox} == {"sent"}, outbox

        # In the PACS: SEG, SR and PDF for every study, each object once (and sent once: no re-send of any).
        found: dict[str, list[str]] = {}
        for iid in pacs.instances():
            tags = pacs.instance_tags(iid)
            if tags.get("Modality") in ("SEG", "SR", "DOC"):
                found.setdefault(tags["StudyInstanceUID"], []).append(tags["Modality"])
        assert {uid: sorted(m) for uid, m in found.items()} == {
            study_uid(i): ["DOC", "SEG", "SR"] for i in range(N_STUDIES)
        }
        assert {r[1] for r in outbox} <= pacs.sop_instance_uids()
        sent = sum(int(n) for n in re.findall(r"outbox batch to .*?: \d+ objects, (\d+) sent", node.log()))
        assert sent == 3 * N_STUDIES, node.log()[-4000:]
