"""C-STORE receive throughput: our ingress server against dcmtk storescp.

Not a test. Generates N synthetic 512x512 int16 CT instances (~0.5 MB each), then in one
run pushes them with the same dcmtk ``storescu`` command (one association, every file)
to:

* ``ingress``      - our server (scp.ae.start_ingress) in its own process: header read,
                     durable write (fsync file + directory), SQLite record (WAL,
                     synchronous=NORMAL, reconciled from the spool at start), Success only after that;
* ``pynetdicom-noop`` - the same AE with a C-STORE handler that only answers Success:
                     pynetdicom's own ceiling on this machine (a diagnostic, not a receiver);
* ``storescp``     - ``storescp -od DIR PORT`` (dcmtk defaults: 16 KB max PDU, no fsync);
* ``storescp-pdu`` - the same with ``-pdu`` equal to ours, so both get the same PDU size;
* ``storescp-sync``- the same plus ``--exec-on-reception "sync #p/#f" --exec-sync``: storescp
                     has no fsync option, this is the nearest (an fsync of each file in a
                     forked ``sync`` before the response, costing a fork/exec as well).

and prints instances/s, MB/s and the ratio ingress / storescp for each round.

Nagle: dcmtk as packaged by Debian leaves Nagle's algorithm on unless ``TCP_NODELAY=1``
is in its environment; storescu -> storescp then stalls ~40 ms per C-STORE on delayed
ACKs (measured 46 ms/instance even with ``storescp --ignore``). So every receiver is
measured twice: with ``TCP_NODELAY=1`` given to storescu and storescp (storescp at its
best: the strict comparison) and with dcmtk's default environment (as deployed).

    python bench/bench_ingress.py [--count 200] [--rounds 1] [--dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

AE_TITLE = "THIGHNODE"
MAX_PDU = 131072

#: dcmtk environments (see the module docstring): Nagle off, and dcmtk's default.
DCMTK_ENVS: dict[str, dict[str, str]] = {
    "nodelay": {**{k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}, "TCP_NODELAY": "1"},
    "default": {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"},
}


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    instances: int
    megabytes: float

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def generate(out_dir: Path, count: int) -> float:
    """Write ``count`` synthetic CT instances of one series; return their total size in MB."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    base = (rng.normal(40, 300, size=(512, 512))).astype(np.int16)
    for k in range(count):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientName = "Bench^Synthetic"
        ds.PatientID = "BENCH"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, -1.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.98, 0.98]
        ds.SliceThickness = 1.5
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(out_dir / f"{k:05d}.dcm", enforce_file_format=True)
    return sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6


def storescu(port: int, files_dir: Path, called: str, env: dict[str, str]) -> float:
    """Push every file of ``files_dir`` in one association; return the wall time in s."""
    cmd = ["storescu", "-aec", called, "+sd", "127.0.0.1", str(port), str(files_dir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def _serve_ingress(spool: str, db: str, port: int, ready, stop, noop: bool = False) -> None:  # runs in the child
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pynetdicom import evt

    from scp.ae import build_ae, start_ingress
    from scp.index import InstanceIndex
    from scp.types import IngressConfig

    config = IngressConfig(
        ae_title=AE_TITLE,
        host="127.0.0.1",
        port=port,
        spool_dir=Path(spool),
        db_path=Path(db),
        min_free_disk_mb=100,
        maximum_pdu_size=MAX_PDU,
    )
    if noop:  # pynetdicom's own ceiling: same AE, a C-STORE handler that only answers Success
        ae = build_ae(config)
        ae.start_server((config.host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
        ready.set()
        stop.wait()
        ae.shutdown()
        return
    index = InstanceIndex(config.db_path, synchronous="NORMAL")  # as the node runs it
    server = start_ingress(config, index)
    ready.set()
    stop.wait()
    server.stop()
    index.close()


def bench_ingress(
    files_dir: Path, work: Path, count: int, megabytes: float, env_name: str, noop: bool = False
) -> Result:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = free_port()
    db = work / "node.sqlite"
    proc = ctx.Process(target=_serve_ingress, args=(str(work / "spool"), str(db), port, ready, stop, noop))
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the ingress server did not start within 60 s")
        seconds = storescu(port, files_dir, AE_TITLE, DCMTK_ENVS[env_name])
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    if noop:
        return Result(f"pynetdicom-noop/{env_name}", seconds, count, megabytes)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    if stored != count:
        raise RuntimeError(f"ingress recorded {stored} instances, expected {count}")
    return Result(f"ingress/{env_name}", seconds, count, megabytes)


def durability_costs(work: Path, size_bytes: int, samples: int = 50) -> tuple[float, float]:
    """Median ms of scp.spool.write_instance and of InstanceIndex.record on this disk, in-process."""
    from scp.index import InstanceIndex
    from scp.spool import write_instance
    from scp.types import ReceivedInstance

    data = os.urandom(size_bytes)
    writes, records = [], []
    index = InstanceIndex(work / "probe.sqlite")
    try:
        for i in range(1, samples + 1):
            t0 = time.perf_counter()
            path = write_instance(work / "probe", "1.2.3", "1.2.3.4", f"1.2.3.4.{i}", data)
            t1 = time.perf_counter()
            index.record(
                ReceivedInstance(f"1.2.3.4.{i}", "1.2", "1.2.3", "1.2.3.4", "CT", "1.2", path, size_bytes, "A", "x", t1)
            )
            writes.append(t1 - t0)
            records.append(time.perf_counter() - t1)
    finally:
        index.close()
    return statistics.median(writes) * 1e3, statistics.median(records) * 1e3


def bench_storescp(
    name: str, extra: list[str], files_dir: Path, work: Path, count: int, megabytes: float, env_name: str
) -> Result:
    name = f"{name}/{env_name}"
    out = work / name.replace("/", "-")
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), *extra, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENVS[env_name],
    )
    try:
        wait_for_port(port)
        seconds = storescu(port, files_dir, "ANY-SCP", DCMTK_ENVS[env_name])
    finally:
        proc.terminate()
        proc.wait(30)
    stored = len([p for p in out.iterdir() if p.is_file()])
    if stored != count:
        raise RuntimeError(f"{name} wrote {stored} files, expected {count}")
    return Result(name, seconds, count, megabytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="instances to send (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (default 1)")
    parser.add_argument("--dir", type=Path, default=None, help="where to generate and receive (default: a temp dir)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (dcmtk) is not installed")

    root = Path(tempfile.mkdtemp(prefix="bench-ingress-", dir=args.dir))
    try:
        files_dir = root / "in"
        t0 = time.perf_counter()
        megabytes = generate(files_dir, args.count)
        print(f"generated {args.count} instances, {megabytes:.1f} MB in {time.perf_counter() - t0:.1f} s under {root}")
        print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        plan: list[tuple[str, str, list[str]]] = [  # (receiver, dcmtk env, storescp options)
            ("ingress", "nodelay", []),
            ("pynetdicom-noop", "nodelay", []),
            ("storescp", "nodelay", []),
            ("storescp-pdu", "nodelay", ["-pdu", str(MAX_PDU)]),
            ("storescp-sync", "nodelay", ["-pdu", str(MAX_PDU), "-xcr", "sync #p/#f", "-xs"]),
            ("ingress", "default", []),
            ("storescp", "default", []),
        ]
        ratios: dict[str, list[float]] = {}
        for round_no in range(1, args.rounds + 1):
            work = root / f"round{round_no}"
            work.mkdir()
            results: dict[str, Result] = {}
            for name, env_name, extra in plan:
                if name in ("ingress", "pynetdicom-noop"):
                    noop = name == "pynetdicom-noop"
                    result = bench_ingress(
                        files_dir, _fresh(work, f"{name}-{env_name}"), args.count, megabytes, env_name, noop
                    )
                else:
                    result = bench_storescp(name, extra, files_dir, work, args.count, megabytes, env_name)
                results[result.name] = result
            print(f"\nround {round_no}: {args.count} instances, {megabytes:.1f} MB, one association each")
            print(f"  {'receiver/dcmtk env':<22} {'seconds':>8} {'inst/s':>8} {'MB/s':>8}")
            for r in results.values():
                print(f"  {r.name:<22} {r.seconds:>8.2f} {r.per_s:>8.1f} {r.mb_per_s:>8.1f}")
            for name, env_name, _ in plan:
                if name == "ingress":
                    continue
                key = f"ingress/{name}/{env_name}"
                ratio = results[f"ingress/{env_name}"].per_s / results[f"{name}/{env_name}"].per_s
                ratios.setdefault(key, []).append(ratio)
                print(f"  ratio ingress / {name} ({env_name}): {ratio:.2f}")
            write_ms, record_ms = durability_costs(work, int(megabytes * 1e6 / args.count))
            print(
                f"  durability on this disk (in-process, median): write_instance {write_ms:.1f} ms "
                f"(write + 2 fsyncs + rename), index.record {record_ms:.1f} ms (1 WAL fsync)"
            )
            shutil.rmtree(work)
        if args.rounds > 1:
            print("\nmedian ratios over rounds:")
            for key, values in ratios.items():
                print(f"  {key}: {statistics.median(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    path.mkdir()
    return path


if __name__ == "__main__":
    raise SystemExit(main())
