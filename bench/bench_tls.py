"""C-STORE throughput over DICOM TLS against plain TCP, ours against dcmtk storescp.

Not a test. Generates N synthetic 512x512 int16 CT instances (~0.5 MB each, as
bench_ingress.py), makes a throwaway CA, server and client certificate (tests.support.certs),
then in one run sends every file in one association to each receiver, plain and TLS:

* ``ingress``  - our ingress (scp.ae.start_ingress) in its own process, plain port and TLS
                 port side by side (mutual TLS), durable write + SQLite record per instance;
* ``storescp`` - dcmtk ``storescp -od DIR`` and ``storescp +tls KEY CRT +cf CA -od DIR``
                 (unique file names, no fsync: dcmtk has none).

with two senders: dcmtk ``storescu`` (``+tls`` with the client certificate) and our own
sender (dicomout.sender.send_files, the node's outbox path). dcmtk runs with
TCP_NODELAY=1 (see bench_ingress.py: Nagle stalls dcmtk otherwise). Prints instances/s,
MB/s and the TLS / plain ratio per receiver and sender.

    python bench/bench_tls.py [--count 100]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for p in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_ingress import AE_TITLE, MAX_PDU, free_port, generate, wait_for_port  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _serve_ingress(work: str, pki_dir: str, port: int, tls_port: int, ready, stop) -> None:  # in the child
    import logging

    logging.basicConfig(level=logging.WARNING)
    from scp.ae import start_ingress
    from scp.index import InstanceIndex
    from scp.tls import TlsConfig
    from scp.types import IngressConfig

    pki = Path(pki_dir)
    config = IngressConfig(
        ae_title=AE_TITLE,
        host="127.0.0.1",
        port=port,
        spool_dir=Path(work) / "spool",
        db_path=Path(work) / "node.db",
        min_free_disk_mb=100,
        maximum_pdu_size=MAX_PDU,
        tls=TlsConfig(pki / "server.crt", pki / "server.key", pki / "ca.crt", require_client_certificate=True),
        tls_port=tls_port,
    )
    index = InstanceIndex(config.db_path, synchronous="NORMAL")
    server = start_ingress(config, index)
    ready.set()
    stop.wait()
    server.stop()
    index.close()


def _storescu(port: int, files: Path, pki: Path | None) -> float:
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")] if pki else []
    cmd = ["storescu", *tls, "-aec", AE_TITLE, "+sd", "127.0.0.1", str(port), str(files)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=DCMTK_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu to port {port} failed: {done.stderr[-2000:]}")
    return elapsed


def _our_sender(port: int, files: Path, pki: Path | None) -> float:
    from dicomout.sender import Destination, send_files
    from scp.tls import TlsConfig

    tls = TlsConfig(pki / "client.crt", pki / "client.key", pki / "ca.crt") if pki else None
    destination = Destination("bench", AE_TITLE, "127.0.0.1", port, "BENCHSCU", timeout_s=60.0, tls=tls)
    paths = sorted(files.iterdir())
    start = time.perf_counter()
    results = send_files(paths, destination)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"our sender to port {port}: {len(failed)} failed, first: {failed[0].error}")
    return elapsed


def _storescp(out: Path, port: int, pki: Path | None) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    tls = ["+tls", str(pki / "server.key"), str(pki / "server.crt"), "+cf", str(pki / "ca.crt")] if pki else []
    proc = subprocess.Popen(
        ["storescp", *tls, "+uf", "-pdu", str(MAX_PDU), "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    wait_for_port(port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="plain and TLS alternate which goes first")
    args = parser.parse_args()
    from tests.support.certs import make_pki

    with tempfile.TemporaryDirectory(prefix="bench_tls_") as tmp:
        work = Path(tmp)
        sets = iter(range(10**6))

        def fresh_files() -> Path:
            """New SOP Instance UIDs for every send: no receiver sees a duplicate."""
            out = work / f"files{next(sets)}"
            generate(out, args.count)
            return out

        megabytes = generate(work / "files-size", args.count)
        make_pki(work / "pki")
        pki = work / "pki"
        print(f"{args.count} instances, {megabytes:.1f} MB; cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

        ctx = mp.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        port, tls_port = free_port(), free_port()
        child = ctx.Process(target=_serve_ingress, args=(str(work / "ingress"), str(pki), port, tls_port, ready, stop))
        child.start()
        ready.wait(60)
        storescp_plain = _storescp(work / "scp-plain", free_port(), None)
        storescp_tls = _storescp(work / "scp-tls", free_port(), pki)
        receivers = {
            "ingress": (port, tls_port),
            "storescp": (int(storescp_plain.args[-1]), int(storescp_tls.args[-1])),
        }
        senders: dict[str, Callable[[int, Path, Path | None], float]] = {
            "storescu": _storescu,
            "our sender": _our_sender,
        }
        try:
            print(f"{'sender':<11} {'receiver':<9} {'plain inst/s':>12} {'MB/s':>7} {'TLS inst/s':>11} {'MB/s':>7} {'TLS/plain':>9}")
            for round_no in range(args.rounds):
                for sender_name, send in senders.items():
                    for receiver_name, (plain_port, secure_port) in receivers.items():
                        runs = [("plain", plain_port, None), ("tls", secure_port, pki)]
                        if round_no % 2:
                            runs.reverse()
                        seconds = {name: send(p, fresh_files(), key) for name, p, key in runs}
                        plain_s, tls_s = seconds["plain"], seconds["tls"]
                        print(
                            f"{sender_name:<11} {receiver_name:<9} {args.count / plain_s:12.1f} {megabytes / plain_s:7.1f} "
                            f"{args.count / tls_s:11.1f} {megabytes / tls_s:7.1f} {plain_s / tls_s:9.2f}"
                        )
        finally:
            stop.set()
            child.join(30)
            for proc in (storescp_plain, storescp_tls):
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
