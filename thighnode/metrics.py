"""The health and metrics endpoint: Prometheus text exposition format 0.0.4 and a JSON health check.

``GET /metrics`` answers the node's figures (instances received, jobs by state, stage durations,
outbox backlog and age, disk free) as the text format Prometheus scrapes (HELP and TYPE lines, one
sample per line); ``GET /healthz`` answers 200 with ``{"status": "ok", ...}`` when the DICOM listener
and the scheduler run, else 503 with what is down. Served by the standard library's HTTP server on a
thread of its own; off by default and bound to loopback by default (settings ``[metrics]``).

The figures are identifiers and counts only: no patient data is ever exposed here.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class InstanceCounter:
    """Instances received (new, not duplicates) since the node started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._count += n

    @property
    def value(self) -> int:
        with self._lock:
            return self._count


@dataclass(frozen=True)
class StageDurations:
    """A stage's recorded durations over finished jobs: how many and their sum (seconds)."""

    count: int
    sum_s: float


@dataclass(frozen=True)
class OutboxBacklog:
    """Pending outbox items of one destination and the age of the oldest (seconds)."""

    pending: int
    oldest_age_s: float


@dataclass(frozen=True)
class MetricsSnapshot:
    """What one scrape reports."""

    instances_received: int
    jobs_by_state: Mapping[str, int]
    stage_durations: Mapping[str, StageDurations]
    outbox: Mapping[str, OutboxBacklog]
    disk_free_bytes: Mapping[str, int]
    up: Mapping[str, bool] = field(default_factory=dict)


def _label(value: str) -> str:
    """A label value escaped as the text format requires (backslash, double quote, line feed)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels_and_suffix, value in samples:
        lines.append(f"{name}{labels_and_suffix} {_number(value)}")


def render_metrics(snapshot: MetricsSnapshot) -> str:
    """The snapshot in the Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    _family(lines, "thighnode_instances_received_total", "counter",
            "DICOM instances received and stored (duplicates not counted) since the node started.",
            [("", snapshot.instances_received)])
    _family(lines, "thighnode_jobs", "gauge", "Jobs in the job store by state.",
            [(f'{{state="{_label(s)}"}}', n) for s, n in sorted(snapshot.jobs_by_state.items())])
    stage_samples: list[tuple[str, float]] = []
    for stage, d in sorted(snapshot.stage_durations.items()):
        stage_samples.append((f'_sum{{stage="{_label(stage)}"}}', d.sum_s))
        stage_samples.append((f'_count{{stage="{_label(stage)}"}}', d.count))
    _family(lines, "thighnode_stage_duration_seconds", "summary",
            "Duration of each processing stage over finished jobs (from the job store's timings).", stage_samples)
    _family(lines, "thighnode_outbox_backlog", "gauge", "Outbox items waiting to be sent, by destination.",
            [(f'{{destination="{_label(d)}"}}', b.pending) for d, b in sorted(snapshot.outbox.items())])
    oldest = max((b.oldest_age_s for b in snapshot.outbox.values()), default=0.0)
    _family(lines, "thighnode_outbox_oldest_age_seconds", "gauge",
            "Age of the oldest pending outbox item (0 when none is pending).", [("", oldest)])
    _family(lines, "thighnode_disk_free_bytes", "gauge", "Free bytes on the file system of each data path.",
            [(f'{{path="{_label(p)}"}}', n) for p, n in sorted(snapshot.disk_free_bytes.items())])
    _family(lines, "thighnode_up", "gauge", "1 when the component runs (listener, scheduler), else 0.",
            [(f'{{component="{_label(c)}"}}', 1 if ok else 0) for c, ok in sorted(snapshot.up.items())])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``(host, port)``, served from a daemon thread.

    ``collect`` returns a fresh :class:`MetricsSnapshot` per scrape; ``health`` returns component -> up.
    """

    def __init__(
        self,
        host: str,
        port: int,
        collect: Callable[[], MetricsSnapshot],
        health: Callable[[], Mapping[str, bool]],
    ) -> None:
        handler = _handler_class(collect, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics and /healthz", *self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_class(
    collect: Callable[[], MetricsSnapshot], health: Callable[[], Mapping[str, bool]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "thighnode-metrics"

        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._answer(200, CONTENT_TYPE, render_metrics(collect()))
                elif path == "/healthz":
                    components = dict(health())
                    ok = bool(components) and all(components.values())
                    body = json.dumps({"status": "ok" if ok else "unavailable", **components})
                    self._answer(200 if ok else 503, "application/json", body + "\n")
                else:
                    self._answer(404, "text/plain; charset=utf-8", "not found: try /metrics or /healthz\n")
            except Exception as exc:  # noqa: BLE001 - a scrape must not kill the server
                log.exception("metrics: %s failed", path)
                self._answer(500, "text/plain; charset=utf-8", f"{type(exc).__name__}\n")

        def _answer(self, status: int, content_type: str, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server signature
            log.debug("metrics %s: " + format, self.address_string(), *args)

    return Handler
