"""What the audit trail and the metrics endpoint cost.

Not a test. In one run, on the disk given with ``--dir`` (default: a temporary folder):

* ``baseline``   - the same XML line appended to a plain file, no fsync (what a log handler does);
* ``audit-file`` - AuditTrail.instances_received into AuditFile (build the PS3.15 A.5 message, append,
                   fsync): the cost paid once per study and peer when a study is complete;
* ``audit-udp``  - the same message also sent by syslog over UDP to a loopback socket;
* ``scrape``     - GET /metrics from a MetricsServer over a store-like snapshot of 1000 jobs' stage timings.

Prints the median and the 95th percentile per call in ms beside the baseline.

    python bench/bench_audit.py [--count 300] [--dir /var/lib/thighnode]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from thighnode.audit import AuditTrail
from thighnode.audit_sinks import AuditFile, SyslogSender
from thighnode.metrics import MetricsServer, MetricsSnapshot, OutboxBacklog, StageDurations

STUDY = "1.2.826.0.1.3680043.8.498.12345678901234567890"
COUNTS = {"1.2.840.10008.5.1.4.1.1.2": 412, "1.2.840.10008.5.1.4.1.1.88.67": 1}


def _times_ms(call: Callable[[], None], count: int) -> list[float]:
    out = []
    for _ in range(count):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _row(name: str, times: list[float], baseline: float | None) -> str:
    median = statistics.median(times)
    p95 = sorted(times)[int(0.95 * (len(times) - 1))]
    ratio = f"{median / baseline:8.1f}x" if baseline else "        -"
    return f"{name:<12} {median:9.3f} {p95:9.3f} {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        memory: list[str] = []

        class Keep:
            def emit(self, message: str) -> None:
                memory.append(message)

            def close(self) -> None:
                pass

        AuditTrail("THIGHNODE", [Keep()]).instances_received(STUDY, "PID-1", COUNTS, "CTSCANNER", "10.0.0.7",
                                                              patient_name="Doe^Jane")
        line = memory[0] + "\n"
        with open(folder / "plain.log", "a", encoding="utf-8") as plain:
            baseline = _times_ms(lambda: (plain.write(line), plain.flush()) and None, args.count)

        trail = AuditTrail("THIGHNODE", [AuditFile(folder / "audit" / "audit.log")])
        audit_file = _times_ms(lambda: trail.instances_received(STUDY, "PID-1", COUNTS, "CTSCANNER", "10.0.0.7",
                                                                patient_name="Doe^Jane"), args.count)
        trail.close()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.setblocking(False)
            udp_trail = AuditTrail("THIGHNODE", [AuditFile(folder / "audit2.log"),
                                                 SyslogSender("127.0.0.1", listener.getsockname()[1], "udp")])
            audit_udp = _times_ms(lambda: udp_trail.instances_received(
                STUDY, "PID-1", COUNTS, "CTSCANNER", "10.0.0.7", patient_name="Doe^Jane"), args.count)
            udp_trail.close()

        stages = {s: StageDurations(1000, 1000 * 3.5) for s in ("select", "load", "check", "segment", "measure",
                                                                 "seg", "sr", "pdf", "queue", "total")}
        snapshot = MetricsSnapshot(1_000_000, {"done": 1000, "failed": 3}, stages, {"pacs": OutboxBacklog(2, 5.0)},
                                   {str(folder): 1 << 40}, {"listener": True, "scheduler": True})
        server = MetricsServer("127.0.0.1", 0, lambda: snapshot, lambda: {"listener": True}).start()
        url = "http://%s:%d/metrics" % server.address
        scrape = _times_ms(lambda: urllib.request.urlopen(url, timeout=10).read() and None, max(20, args.count // 5))
        server.stop()

    base = statistics.median(baseline)
    print(f"{len(line)} bytes per audit message; {args.count} calls each; times in ms per call")
    print(f"{'':<12} {'median':>9} {'p95':>9} {'vs base':>9}")
    print(_row("baseline", baseline, None))
    print(_row("audit-file", audit_file, base))
    print(_row("audit-udp", audit_udp, base))
    print(_row("scrape", scrape, base))


if __name__ == "__main__":
    main()
