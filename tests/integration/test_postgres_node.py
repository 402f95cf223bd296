"""The node's stores on PostgreSQL (issue 26: workers on other hosts), end to end with real servers: a real
PostgreSQL 15, a real `thighnode serve` whose ``[storage] database`` is its URL, dcmtk storescu as the scanner
and a real Orthanc as the PACS; then the Celery set-up (RabbitMQ, two `thighnode worker` processes) on the same
database. Nothing is written to a SQLite file: every table is in PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
from tests.support.celery_worker import study_uid, write_studies
from tests.support.node import REPO_ROOT, NodeProcess
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port
from tests.support.processes import stop_process_group
from tests.support.rabbitmq import RabbitMQServer

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.66026"
BUNDLE = REPO_ROOT / "bundles" / "thighnode_demo"
ENDED = ("done", "declined", "failed")
PASSWORD = "pw-never-logged"  # the test server trusts 127.0.0.1 and ignores it; the logs must not show it


def _with_password(url: str) -> str:
    return url.replace("thighnode@", f"thighnode:{PASSWORD}@", 1)


def _push(port: int, files: list[Path]) -> None:
    done = subprocess.run([require_tool("storescu"), "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def _pacs_objects(pacs: OrthancServer) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for iid in pacs.instances():
        tags = pacs.instance_tags(iid)
        if tags.get("Modality") in ("SEG", "SR", "DOC"):
            found.setdefault(tags["StudyInstanceUID"], []).append(tags["Modality"])
    return {uid: sorted(m) for uid, m in found.items()}


def _rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


def _destination(pacs: OrthancServer) -> str:
    return f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'


def test_a_node_on_an_unreachable_postgresql_says_where_it_looked(tmp_path: Path) -> None:
    port = free_port()
    extra = f'[storage]\ndatabase = "postgresql://node:s3cret@127.0.0.1:{port}/thighnode?connect_timeout=3"\n'
    node = NodeProcess(tmp_path, extra_config=extra)
    out = node.cli("status")
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: cannot connect to PostgreSQL at 127.0.0.1:{port}/thighnode: "), out.stderr
    assert "s3cret" not in out.stderr and out.stderr.count("\n") == 1


def test_a_pushed_study_s_outputs_reach_the_pacs_with_the_stores_on_postgresql(tmp_path: Path, postgres_server) -> None:  # noqa: ANN001
    phantom = generate_phantom(PhantomParams(seed=26, sex="F", height_m=1.65, spacing_mm=(5.0, 4.0, 4.0),
                                             fov_top_mm=-60.0, fov_bottom_mm=-260.0))
    files = write_dicom_series(
        phantom, tmp_path / "ct", patient_id="TN-PG-1", patient_name="Postgres^Node", patient_sex="F",
        birth_date="19600101", height_m=1.65, study_uid=STUDY, series_uid=STUDY + ".1",
        frame_of_reference_uid=STUDY + ".2", study_date="20240612", accession="PG1",
    )
    url = postgres_server.create_database()
    with OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        extra = f'[storage]\ndatabase = "{_with_password(url)}"\n\n{_destination(pacs)}'
        with NodeProcess(tmp_path / "node", quiet_period_s=1.0, extra_config=extra, load_model=True) as node:
            _push(node.port, files)
            status = node.wait_for(
                lambda s: bool(s["jobs"]) and s["jobs"][0]["state"] in ENDED and s["outbox_counts"].get("pending", 0) == 0
                and s["outbox_counts"].get("sent", 0) > 0, timeout_s=900, what="the study processed and sent",
            )
        log = node.log()
        assert _pacs_objects(pacs) == {STUDY: ["DOC", "SEG", "SR"]}
    job = status["jobs"][0]
    assert (job["study_uid"], job["state"]) == (STUDY, "done"), job
    assert not (node.data_dir / "thighnode.db").exists()
    assert _rows(url, "SELECT to_state FROM job_events ORDER BY id") == [("received",), ("ready",), ("running",), ("done",)]
    assert _rows(url, "SELECT state, COUNT(*) FROM outbox GROUP BY state") == [("sent", 3)]
    assert _rows(url, "SELECT COUNT(*) FROM instances")[0][0] == len(files)
    assert f"stores in postgresql 127.0.0.1:{postgres_server.port}/" in log, log[-3000:]
    assert PASSWORD not in log
    postgres_server.drop_database(url)


def test_celery_workers_share_the_node_s_postgresql_stores(tmp_path: Path, postgres_server) -> None:  # noqa: ANN001
    """The issue-26 deployment in one machine: node and two workers meet only through RabbitMQ, PostgreSQL and
    the shared data directory (NFS in production); every study is done once and each output reaches the PACS once."""
    n = 4
    studies = write_studies(tmp_path / "ct", n, "P")
    url = postgres_server.create_database()
    with RabbitMQServer(tmp_path / "mq") as mq, OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        extra = (f'[storage]\ndatabase = "{_with_password(url)}"\n\n[compute]\nbackend = "celery"\nbroker_url = "{mq.url}"\n'
                 f'queue = "thighnode.pg"\n\n{_destination(pacs)}')
        node = NodeProcess(tmp_path / "node", quiet_period_s=3.0, extra_config=extra).start()
        workers = []
        for name in ("w0@pg", "w1@pg"):
            log = open(tmp_path / f"{name[:2]}.log", "ab")
            workers.append(subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "tests" / "support" / "celery_worker.py"), str(node.config), name],
                cwd=REPO_ROOT, env=node.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()

        def worker_logs() -> str:
            return "\n".join((tmp_path / f"w{i}.log").read_text(errors="replace") for i in range(2))

        try:
            deadline = time.monotonic() + 300
            while worker_logs().count("ready in") < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert worker_logs().count("ready in") == 2, worker_logs()[-6000:]
            _push(node.port, studies)
            status = node.wait_for(
                lambda s: len(s["jobs"]) == n and all(j["state"] in ENDED for j in s["jobs"])
                and s["outbox_counts"].get("pending", 0) == 0, timeout_s=900, what="all studies processed and sent",
            )
        finally:
            for w in workers:
                stop_process_group(w)
            node.stop()
        assert [j["state"] for j in status["jobs"]] == ["done"] * n, [(j["job"], j["reason"]) for j in status["jobs"]]
        assert _pacs_objects(pacs) == {study_uid(i): ["DOC", "SEG", "SR"] for i in range(n)}
    logs = worker_logs()
    assert "task ended on w0@pg" in logs or "task ended on w1@pg" in logs, logs[-6000:]
    assert f"stores in postgresql 127.0.0.1:{postgres_server.port}/" in logs and PASSWORD not in logs + node.log()
    assert not (node.data_dir / "thighnode.db").exists()
    claims = _rows(url, "SELECT job_id, COUNT(*) FROM job_events WHERE to_state = 'running' GROUP BY job_id")
    assert sorted(c for _, c in claims) == [1] * n
    assert _rows(url, "SELECT state, COUNT(*) FROM outbox GROUP BY state") == [("sent", 3 * n)]
    postgres_server.drop_database(url)
