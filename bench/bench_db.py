"""The node's stores on SQLite vs PostgreSQL, same machine, same run: what a job claim, a job's finish and
one received instance's index record cost (latency per operation, one process; then two processes claiming
from the same job store at once, as the node and a worker host do).

    .venv/bin/python bench/bench_db.py [--jobs 300]

SQLite: the node's file in a temp dir (WAL; the index with synchronous=NORMAL as the node opens it, the
job store with FULL). PostgreSQL: a fresh local PostgreSQL 15 cluster on loopback (tests/support/postgres.py,
durable: fsync on, as a production server; a server on another host adds a network round trip per
statement). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scp.index import InstanceIndex  # noqa: E402
from scp.types import ReceivedInstance  # noqa: E402
from thighnode.jobs import JobStore, StudyProgress  # noqa: E402

_CLAIMER = """
import sys, time
from thighnode.jobs import JobStore
store, n = JobStore(sys.argv[1]), 0
while (job := store.claim_next()) is not None:
    store.finish(job.id, "done", "bench")
    n += 1
print(n)
"""


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"median {statistics.median(s) * 1e3:6.2f} ms, p95 {s[int(0.95 * (len(s) - 1))] * 1e3:6.2f} ms"


def _instance(i: int) -> ReceivedInstance:
    return ReceivedInstance(f"1.2.9.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.9", "1.2.9.1", "CT", "1.2.840.10008.1.2.1",
                            Path(f"/spool/1.2.9/1.2.9.1/1.2.9.{i}.dcm"), 1000, "CT1", "127.0.0.1", float(i))


def measure(target: Path | str, jobs: int) -> dict[str, str]:
    store = JobStore(target)
    store.sync([StudyProgress(f"1.2.{i}", 1.0) for i in range(jobs)], now=100.0, quiet_period_s=1.0)
    claim, finish = [], []
    for _ in range(jobs):
        t = time.perf_counter()
        job = store.claim_next()
        claim.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.finish(job.id, "done", "bench")
        finish.append(time.perf_counter() - t)
    store.sync([StudyProgress(f"2.2.{i}", 1.0) for i in range(jobs)], now=200.0, quiet_period_s=1.0)
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(target)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    counts = [int(p.communicate(timeout=600)[0]) for p in procs]
    two = time.perf_counter() - t
    store.close()
    index = InstanceIndex(target, synchronous="NORMAL")
    record = []
    for i in range(jobs):
        t = time.perf_counter()
        index.record(_instance(i))
        record.append(time.perf_counter() - t)
    index.close()
    return {"claim": _ms(claim), "finish": _ms(finish), "index record": _ms(record),
            "2 processes": f"{jobs} claim+finish in {two:.2f} s (incl. start-up), split {counts[0]}/{counts[1]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    from tests.support.postgres import PostgresServer

    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp, PostgresServer(durable=True) as pg:
        url = pg.create_database()
        results = {"SQLite (WAL)": measure(Path(tmp) / "thighnode.db", args.jobs),
                   "PostgreSQL 15": measure(url, args.jobs)}
    print(f"{args.jobs} jobs, one process (claim = BEGIN IMMEDIATE / advisory lock, select, update, event; "
          "finish likewise; index record = one received instance)")
    for name, figures in results.items():
        for what, figure in figures.items():
            print(f"  {name:14s} {what:13s} {figure}")


if __name__ == "__main__":
    main()
