"""thighnode.metrics: the Prometheus text format and the /healthz answer, served by a real HTTP server;
the job store's stage durations."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.prometheus import parse_exposition, value
from thighnode.jobs import DONE, FAILED, JobStore, StudyProgress
from thighnode.metrics import MetricsServer, MetricsSnapshot, OutboxBacklog, StageDurations, render_metrics

SNAPSHOT = MetricsSnapshot(
    instances_received=42,
    jobs_by_state={"done": 3, "failed": 1, "ready": 0},
    stage_durations={"segment": StageDurations(3, 61.5), "load": StageDurations(3, 2.25)},
    outbox={"pacs": OutboxBacklog(5, 30.0), 'odd "name"\\x': OutboxBacklog(1, 2.0)},
    disk_free_bytes={"/var/lib/thighnode": 123456789},
    up={"listener": True, "scheduler": False},
)


def test_the_exposition_is_valid_text_format_with_the_figures() -> None:
    text = render_metrics(SNAPSHOT)
    samples = parse_exposition(text)
    assert value(samples, "thighnode_instances_received_total") == 42
    assert value(samples, "thighnode_jobs", state="done") == 3
    assert value(samples, "thighnode_jobs", state="failed") == 1
    assert value(samples, "thighnode_stage_duration_seconds_sum", stage="segment") == 61.5
    assert value(samples, "thighnode_stage_duration_seconds_count", stage="load") == 3
    assert value(samples, "thighnode_outbox_backlog", destination="pacs") == 5
    assert value(samples, "thighnode_outbox_backlog", destination='odd "name"\\x') == 1
    assert value(samples, "thighnode_outbox_oldest_age_seconds") == 30.0
    assert value(samples, "thighnode_disk_free_bytes", path="/var/lib/thighnode") == 123456789
    assert value(samples, "thighnode_up", component="scheduler") == 0
    assert "# TYPE thighnode_stage_duration_seconds summary" in text
    assert "# TYPE thighnode_instances_received_total counter" in text


def test_the_reader_refuses_what_the_format_does_not_allow() -> None:
    with pytest.raises(AssertionError):
        parse_exposition("thighnode_x 1\n")  # no TYPE / HELP
    with pytest.raises(AssertionError):
        parse_exposition('# HELP a x\n# TYPE a gauge\na{l="un"escaped"} 1\n')


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_server_answers_metrics_and_health_503_when_a_component_is_down() -> None:
    health = {"listener": True, "scheduler": True}
    server = MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT, lambda: health).start()
    try:
        base = "http://%s:%d" % server.address
        status, content_type, body = _get(base + "/metrics")
        assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert value(parse_exposition(body), "thighnode_instances_received_total") == 42
        status, content_type, body = _get(base + "/healthz")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body) == {"status": "ok", "listener": True, "scheduler": True}
        health["scheduler"] = False
        status, _, body = _get(base + "/healthz")
        assert status == 503 and json.loads(body)["status"] == "unavailable"
        assert _get(base + "/other")[0] == 404
    finally:
        server.stop()


def test_stage_durations_sum_the_timings_of_finished_jobs(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "db.sqlite")
    try:
        for n, (uid, state, timings) in enumerate(
            [("1.2.1", DONE, {"load": 1.5, "segment": 10.0}), ("1.2.2", FAILED, {"load": 0.5})]
        ):
            jobs.sync([StudyProgress(uid, 100.0 + n)], now=200.0, quiet_period_s=1)
            job = jobs.claim_next(now=201.0)
            assert job is not None
            jobs.finish(job.id, state, "", timings_s=timings, now=202.0)
        jobs.sync([StudyProgress("1.2.3", 150.0)], now=300.0, quiet_period_s=1)  # ready, no timings yet
        assert jobs.stage_durations() == {"load": (2, 2.0), "segment": (1, 10.0)}
    finally:
        jobs.close()
