"""End-to-end benchmark: scanner (dcmtk storescu) → thighnode → PACS (Orthanc).

Generates a 512x512 phantom thigh CT (about 300 slices), starts a real Orthanc and a real
`thighnode serve` (demo bundle, CPU unless a GPU is visible) on free loopback ports, pushes the study,
and prints:

- end-to-end latency: study ready (quiet period over) → last output acknowledged by Orthanc;
- the time of each stage (select, load, check, segment, measure, seg, sr, pdf, queue);
- the node's peak resident memory (VmHWM; targets of issue 24: <= 2 GB for 300 slices, <= 4 GB for 1000) and
  the peak of its sampled resident memory within each stage;
- the size of each output object, the SEG's as a share of the CT's bytes beside the target of issue 24
  (BINARY <= 10 %, LABELMAP <= 1 %) and beside the baseline, the same SEG in highdicom's default
  encoding (Explicit VR Little Endian, empty frames omitted: the node's SEG inflated / decompressed and
  written again in this run);
- the transfer syntax each object was sent in (the outbox) and the one Orthanc stored, and whether the
  SEG Orthanc gives back decodes to the same frames as the node's file.

Usage: .venv/bin/python bench/bench_e2e.py [--slices 300|1000] [--seg-type BINARY|LABELMAP]
       [--binary-compression deflate|JPEG2000|none]
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom.uid import UID  # noqa: E402

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class RssSampler(threading.Thread):
    """The node's resident memory (VmRSS) every ``every_s`` seconds, with the wall-clock time, until stopped."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []  # (time, the node's CPU seconds so far)
        self._stop_event = threading.Event()

    def run(self) -> None:
        status, stat = Path(f"/proc/{self.pid}/status"), Path(f"/proc/{self.pid}/stat")
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop_event.wait(self.every_s):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cpu_s = (int(fields[11]) + int(fields[12])) / tick  # utime + stime of the whole process
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.time(), int(line.split()[1]) / 1024.0))
                        self.cpu.append((time.time(), cpu_s))
                        break
            except OSError:
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


_STAGE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*job \d+: stage (\w+) (started|ended)")


def stage_cpu(log_text: str, cpu: list[tuple[float, float]]) -> list[tuple[str, float]]:
    """The node's CPU seconds within each stage (all its threads; sampled, so +-0.05 s at each end)."""
    out = []
    for name, t0, t1 in _stage_spans(log_text):
        inside = [c for t, c in cpu if t0 <= t <= t1]
        out.append((name, inside[-1] - inside[0] if len(inside) > 1 else float("nan")))
    return out


def _stage_spans(log_text: str) -> list[tuple[str, float, float]]:
    started: dict[str, float] = {}
    spans = []
    for line in log_text.splitlines():
        m = _STAGE_LINE.match(line)
        if not m:
            continue
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(3) == "started":
            started[m.group(2)] = at
        elif m.group(2) in started:
            spans.append((m.group(2), started.pop(m.group(2)), at))
    return spans


def stage_peaks(log_text: str, samples: list[tuple[float, float]]) -> list[tuple[str, float]]:
    """Peak sampled RSS (MB) within each stage, from the node log's "stage X started/ended" lines."""
    peaks = []
    for name, t0, t1 in _stage_spans(log_text):
        inside = [rss for t, rss in samples if t0 <= t <= t1]
        peaks.append((name, max(inside) if inside else float("nan")))
    return peaks


def wait_delivered(node: NodeProcess, timeout_s: float) -> None:
    """Until every job has ended and no outbox item is pending, read from the node's database (on a loaded
    machine ``thighnode status`` can take longer than its 60 s limit)."""
    import sqlite3

    db = node.data_dir / "thighnode.db"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited with {node.proc.returncode}; log:\n{node.log()[-3000:]}")
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                ended = con.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('done', 'declined', 'failed')").fetchone()[0]
                open_jobs = con.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'declined', 'failed')"
                ).fetchone()[0]
                pending = con.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
            finally:
                con.close()
            if ended and not open_jobs and not pending:  # a study split by a slow C-STORE is reprocessed whole
                return
        except sqlite3.OperationalError:
            pass  # not created yet, or busy
        time.sleep(1.0)
    raise TimeoutError(f"the study's outputs were not delivered within {timeout_s:.0f} s")


SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
TARGET_PCT = {"BINARY": 10.0, "LABELMAP": 1.0}


def _report_seg(path: Path, ct_bytes: float, seg_type: str, pacs: OrthancServer, tmp: Path) -> None:
    """The SEG's size against the CT, the target and the baseline encoding; what Orthanc holds of it."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    size = path.stat().st_size
    t = time.perf_counter()
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = ds.pixel_array
        ds.decompress(generate_instance_uid=False)
        if int(ds.BitsAllocated) == 1:
            ds.PixelData = pydicom.pixels.pack_bits(frames.ravel())
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    baseline_path = tmp / "seg_baseline.dcm"
    ds.save_as(baseline_path)
    baseline = baseline_path.stat().st_size
    print(
        f"  SEG {size / 1e6:.2f} MB = {100 * size / ct_bytes:.2f} % of the CT's {ct_bytes / 1e6:.0f} MB "
        f"(target <= {TARGET_PCT[seg_type]:g} %); baseline (Explicit VR LE, empty frames omitted) "
        f"{baseline / 1e6:.2f} MB = {100 * baseline / ct_bytes:.1f} % (written in {time.perf_counter() - t:.1f} s)"
    )
    uid = str(ds.SOPInstanceUID)
    held = tmp / "seg_from_orthanc.dcm"
    for instance in pacs.instances():
        held.write_bytes(pacs.get_bytes(f"/instances/{instance}/file"))
        back = pydicom.dcmread(held)
        if str(back.SOPInstanceUID) != uid:
            continue
        ours = pydicom.dcmread(path)
        if back.file_meta.TransferSyntaxUID.is_encapsulated or ours.file_meta.TransferSyntaxUID.is_encapsulated:
            same = np.array_equal(back.pixel_array, ours.pixel_array)
        else:  # the packed frames as they are: a 1000-slice BINARY SEG unpacked is ~6 GB per copy
            same = back.PixelData == ours.PixelData and back.NumberOfFrames == ours.NumberOfFrames
        on_disk = pacs.get_json(f"/instances/{instance}/attachments/dicom/info")["CompressedSize"]
        print(
            f"  Orthanc stored the SEG as {pacs.instance_metadata(instance, 'TransferSyntax')} "
            f"({held.stat().st_size / 1e6:.2f} MB file, {on_disk / 1e6:.2f} MB on its disk = "
            f"{100 * on_disk / ct_bytes:.2f} % of the CT); its frames {'equal' if same else 'DIFFER from'} the node's"
        )


def site_outbox_env() -> dict[str, str]:
    """The [outbox] timing of config/node.toml (what a site gets by default: the outbox polled every
    send_interval_s) as THIGHNODE_* overrides of the test config's short intervals, so the latency
    includes the wait for the outbox's poll a site has."""
    import tomllib

    outbox = tomllib.loads((REPO / "config" / "node.toml").read_text(encoding="utf-8"))["outbox"]
    return {f"THIGHNODE_OUTBOX__{k.upper()}": str(outbox[k]) for k in ("send_interval_s", "base_delay_s", "max_delay_s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--seg-type", default="BINARY", choices=["BINARY", "LABELMAP"])
    parser.add_argument("--binary-compression", default="deflate", choices=["deflate", "JPEG2000", "none"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--quiet-period-s", type=float, default=2.0,
                        help="the node's quiet period; longer on a loaded machine, where C-STORE can pause longer")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="thighnode-bench-e2e-"))
    try:
        t = time.perf_counter()
        height = 1.65
        # The phantom spans about 535 mm (iliac crest to knee) at 1.65 m: choose dz for `slices` slices.
        dz = round(535.0 / args.slices, 2)
        phantom = generate_phantom(PhantomParams(seed=11, height_m=height, spacing_mm=(dz, 1.6, 1.6)))
        paths = write_dicom_series(
            phantom, tmp / "study", patient_id="BENCH-1", patient_name="Bench^E2E", patient_sex="F",
            birth_date="19500101", height_m=height, study_uid="1.2.826.0.1.3680043.8.498.990001",
            series_uid="1.2.826.0.1.3680043.8.498.990002", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.990003",
            study_date="20240301", accession="BENCH", pixel_spacing_mm=0.8, matrix=512,
        )
        n = len(paths)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {n} slices 512x512, {size_mb:.0f} MB, generated in {time.perf_counter() - t:.1f} s")

        node_port = free_port()
        with OrthancServer(tmp / "orthanc", modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", node_port)}) as pacs:
            extra = (
                f'[outputs]\nseg_type = "{args.seg_type}"\nbinary_compression = "{args.binary_compression}"\n\n'
                f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
            )
            node = NodeProcess(tmp / "node", quiet_period_s=args.quiet_period_s, extra_config=extra, load_model=True,
                               port=node_port, extra_env=site_outbox_env())
            (tmp / "node").mkdir(parents=True, exist_ok=True)
            node.start(timeout_s=300)
            sampler = RssSampler(node.proc.pid) if node.proc else None
            if sampler:
                sampler.start()
            try:
                t_send = time.time()
                out = subprocess.run(
                    ["storescu", "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(node.port), *map(str, paths)],
                    capture_output=True, text=True, timeout=1800,
                )
                t_sent = time.time()
                if out.returncode != 0:
                    print(out.stderr)
                    return 1
                print(f"C-STORE of the study: {t_sent - t_send:.1f} s ({n / (t_sent - t_send):.1f} instances/s)")
                wait_delivered(node, timeout_s=3600)
                peak = _peak_rss_mb(node.proc.pid) if node.proc else float("nan")
            finally:
                if sampler:
                    sampler.stop()
                node.stop()
            db = node.data_dir / "thighnode.db"
            import sqlite3

            con = sqlite3.connect(db)
            job_id, state, reason, timings = con.execute(
                "SELECT id, state, reason, timings_json FROM jobs ORDER BY id DESC LIMIT 1"
            ).fetchone()
            ready_at = con.execute(
                "SELECT at FROM job_events WHERE job_id = ? AND to_state = 'ready' ORDER BY id LIMIT 1", (job_id,)
            ).fetchone()[0]
            last_sent = con.execute("SELECT MAX(sent_at) FROM outbox WHERE state = 'sent'").fetchone()[0]
            events = con.execute("SELECT to_state, at FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
            queued = con.execute("SELECT created_at, sent_at FROM outbox WHERE state = 'sent' ORDER BY id").fetchall()
            outputs = con.execute("SELECT path, sop_class_uid, transfer_syntax_uid FROM outbox").fetchall()
            con.close()
            print(f"job {job_id}: {state} ({reason})")
            if last_sent is None:
                print("nothing was delivered")
                return 1
            print(f"end-to-end latency (ready -> last object acknowledged by Orthanc): {last_sent - ready_at:.1f} s")
            print("stage timings (s): " + json.dumps(json.loads(timings)))
            print("after ready (s): job " + ", ".join(f"{st} {at - ready_at:.2f}" for st, at in events if at >= ready_at)
                  + "; outbox queued/sent " + ", ".join(f"{c - ready_at:.2f}/{t - ready_at:.2f}" for c, t in queued))
            for line in node.log().splitlines():
                if "outbox batch to" in line:  # how long the send itself took (Orthanc's store included)
                    print("  " + line.split(" INFO ", 1)[-1])
            print(f"node peak resident memory (VmHWM): {peak:.0f} MB")
            if sampler:
                peaks = stage_peaks(node.log(), sampler.samples)
                print("peak RSS by stage (MB, sampled every 0.05 s): "
                      + ", ".join(f"{name} {mb:.0f}" for name, mb in peaks))
                print("node CPU s by stage (all threads, sampled): "
                      + ", ".join(f"{name} {s:.2f}" for name, s in stage_cpu(node.log(), sampler.cpu)))
                if sampler.cpu:
                    print(f"node CPU s from the send to the end: {sampler.cpu[-1][1] - sampler.cpu[0][1]:.1f}")
            for path, sop_class, ts in outputs:
                p = Path(path)
                if p.exists():
                    print(f"  {p.name[:4]:<5} {p.stat().st_size / 1e6:8.2f} MB  sent as {UID(ts).name if ts else '?'}")
                if sop_class in SEG_CLASSES and p.exists():
                    _report_seg(p, size_mb * 1e6, args.seg_type, pacs, tmp)
            print(f"Orthanc holds {pacs.count_instances()} instances")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
