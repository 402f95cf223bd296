"""Workers benchmark (issue 26): studies per hour with 1 and 2 local workers, and the overhead per task of the
Celery path against the local one, measured in the same run on the same machine.

Writes N small phantom CT studies (5 x 4 x 4 mm, 40 slices: tests/support/celery_worker.py), pushes them with
dcmtk storescu to a node started in this process, and reads the job store:

- local-1 / local-2: ``[compute] backend = "local"``, ``[processing] workers`` = 1 / 2;
- celery-1: ``[compute] backend = "celery"``, a real RabbitMQ (tests/support/rabbitmq.py) and one worker process
  (tests/support/celery_worker.py, which runs thighnode.compute.run_worker as `thighnode worker` does).

The model is the phantoms' ground truth in every mode (the demo bundle takes minutes per study on a shared
2-core CPU, which would drown the figures being compared); every other stage runs (select, load, check,
measure, compare, SEG/SR/PDF written, queued). With the model, each study takes longer by its inference time;
the per-task overhead stays as measured here.

Figures: span = first job ready -> last job done; studies/hour = N / span; overhead per task = with one
worker, the hand-over from one job recorded done to the next job's workflow starting (its done time minus
the workflow's own total), over the jobs that were already waiting: for local, the assembly tick that claims
the next job; for Celery, the acknowledgement, the broker delivering the next message and the worker process
reading the job. With 2 local workers the hand-over column is not meaningful (jobs overlap). The quiet period is 5 s (a loaded machine
pausing longer than a shorter one inside a push splits a study into two jobs).

Usage: .venv/bin/python bench/bench_workers.py [--studies 4]
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.celery_worker import PhantomTruth, write_studies  # noqa: E402
from tests.support.node import write_config  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.rabbitmq import RabbitMQServer  # noqa: E402
from thighnode.jobs import FINAL_STATES  # noqa: E402
from thighnode.node import Node  # noqa: E402
from thighnode.settings import load_settings  # noqa: E402


def _run(mode: str, root: Path, files: list[Path], n: int, broker_url: str = "") -> dict[str, float]:
    workers = 2 if mode == "local-2" else 1
    backend = "celery" if mode.startswith("celery") else "local"
    home = root / mode
    home.mkdir()
    extra = f"[processing]\nworkers = {workers}\n\n[compute]\nbackend = \"{backend}\"\n"
    if broker_url:
        extra += f'broker_url = "{broker_url}"\nqueue = "thighnode.bench"\n'
    config = write_config(home / "node.toml", port=free_port(), data_dir=home / "var", quiet_period_s=5.0, extra=extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THIGHNODE_")}
    env["THIGHNODE_HOME"] = str(home)
    settings = load_settings(config, environ=env)
    node = Node(settings, segmenter=PhantomTruth())
    worker = None
    node.start()
    try:
        if backend == "celery":
            log = open(home / "worker.log", "ab")
            worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "celery_worker.py"),
                                       str(config), "bench@local"], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            while "ready in" not in (home / "worker.log").read_text(errors="replace"):
                time.sleep(0.2)
        subprocess.run([shutil.which("storescu") or "storescu", "-aet", "BENCH", "-aec", settings.node.ae_title,
                        "127.0.0.1", str(settings.node.port), *map(str, files)], check=True, capture_output=True)
        assert node.jobs is not None
        while True:
            jobs = node.jobs.jobs()
            if len({j.study_uid for j in jobs}) == n and all(j.state in FINAL_STATES for j in jobs):
                break
            time.sleep(0.2)
        events = {j.id: node.jobs.events(j.id) for j in jobs}
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        node.stop()
    states = sorted({j.state for j in jobs})
    first_ready = min(e.at for evs in events.values() for e in evs if e.to_state == "ready")
    last_done = max(e.at for evs in events.values() for e in evs if e.to_state in FINAL_STATES)
    span = last_done - first_ready
    work = sum(j.timings_s.get("total", 0.0) for j in jobs)
    # A serial worker's hand-over: the workflow of the next job starts (its done time minus its own total)
    # after the previous job was recorded done, counted where the next job was already ready by then.
    ends = sorted((max(e.at for e in events[j.id] if e.to_state in FINAL_STATES), j) for j in jobs)
    gaps = []
    for (done_prev, _), (done_next, nxt) in zip(ends, ends[1:]):
        ready_next = max(e.at for e in events[nxt.id] if e.to_state == "ready")
        if ready_next < done_prev:
            gaps.append(done_next - nxt.timings_s.get("total", 0.0) - done_prev)
    return {"span_s": span, "per_hour": n / span * 3600.0, "work_s": work,
            "overhead_s": sum(gaps) / len(gaps) if gaps else float("nan"), "handovers": len(gaps),
            "states": f"{','.join(states)} ({len(jobs)} jobs)", "per_study_s": work / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    args = parser.parse_args()
    n = args.studies
    root = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    try:
        files = write_studies(root / "ct", n, "B")
        print(f"{n} studies of {len(files) // n} slices; CPUs {os.cpu_count()}; load average {os.getloadavg()}")
        results = {mode: _run(mode, root, files, n) for mode in ("local-1", "local-2")}
        with RabbitMQServer(root / "mq") as mq:
            results["celery-1"] = _run("celery-1", root, files, n, broker_url=mq.url)
        print(f"{'mode':<10} {'span s':>8} {'studies/h':>10} {'workflow s/study':>17} {'hand-over s/task':>17}  states")
        for mode, r in results.items():
            handover = "n/a (overlap)" if mode == "local-2" else f"{r['overhead_s']:.3f}"
            print(f"{mode:<10} {r['span_s']:8.1f} {r['per_hour']:10.0f} {r['per_study_s']:17.2f} "
                  f"{handover:>17}  {r['states']}")
        speedup = results["local-2"]["per_hour"] / results["local-1"]["per_hour"]
        print(f"2 local workers / 1: x{speedup:.2f} (this machine has {os.cpu_count()} cores, shared)")
        extra = results["celery-1"]["overhead_s"] - results["local-1"]["overhead_s"]
        print(f"Celery overhead per task against local (1 worker each, hand-over): {extra:+.3f} s "
              f"(local {results['local-1']['overhead_s']:.3f} s, celery {results['celery-1']['overhead_s']:.3f} s)")
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
