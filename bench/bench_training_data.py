"""Benchmark of the training's case data: in memory vs the memory-mapped case cache.

For labelled folders (NIfTI pairs) and a training settings file, each mode runs in a fresh
child process and prints: the time to load (prepare) every case, the process's anonymous
memory (RssAnon: what cannot be paged out) and its file-backed resident memory (RssFile:
the kernel's reclaimable file cache) after loading and after N training batches, and the
mean time to draw one batch (patch sampling + augmentation, no network).

Modes: ``memory`` (case_cache = false), ``cache-build`` (empty cache: prepare and write),
``cache-reuse`` (the same cache again: open the entries only).

Usage: .venv/bin/python bench/bench_training_data.py --config config/train_demo.toml \\
           [--data DIR ...] [--steps 50] [--cache-dir /tmp/bench_case_cache]
(--data defaults to the config's data_dirs; phantoms are not generated here.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> None:
    import torch

    from modelkit.casecache import CaseCache
    from modelkit.train_settings import TrainSettings
    from modelkit.training import _batch_for_step, build_transforms, load_cases
    from pipeline.labels import load_label_table

    torch.set_num_threads(2)
    settings = TrainSettings.from_toml(args.config)
    data = tuple(Path(d) for d in args.data) if args.data else settings.data_dirs
    labels = load_label_table()
    cache = None if args.mode == "memory" else CaseCache(Path(args.cache_dir))
    t0 = time.perf_counter()
    cases = load_cases(data, (), labels, settings.preprocess, settings.soft_labels, cache=cache, indices=True)
    load_s = time.perf_counter() - t0
    anon_loaded, file_loaded = _status_kb("RssAnon"), _status_kb("RssFile")
    transforms = build_transforms(settings, labels.num_classes)
    t0 = time.perf_counter()
    for step in range(args.steps):
        _batch_for_step(cases, transforms, settings, step)
    step_s = (time.perf_counter() - t0) / max(args.steps, 1)
    print(json.dumps({"mode": args.mode, "cases": len(cases), "load_s": load_s,
                      "anon_loaded_gb": anon_loaded / 1e6, "file_loaded_gb": file_loaded / 1e6,
                      "anon_end_gb": _status_kb("RssAnon") / 1e6, "file_end_gb": _status_kb("RssFile") / 1e6,
                      "batch_s": step_s,
                      "model_voxels_m": sum(c.image.size for c in cases) / 1e6}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/train_demo.toml"))
    parser.add_argument("--data", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.mode:
        child(args)
        return 0
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="bench_case_cache_"))
    shutil.rmtree(cache_dir, ignore_errors=True)
    rows = []
    for mode in ("memory", "cache-build", "cache-reuse"):
        cmd = [sys.executable, __file__, "--mode", mode, "--config", str(args.config), "--steps", str(args.steps),
               "--cache-dir", str(cache_dir)] + (["--data", *args.data] if args.data else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    size_gb = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 1e9
    print(f"{rows[0]['cases']} cases, {rows[0]['model_voxels_m']:.1f} M model voxels, config {args.config}; "
          f"{args.steps} batches per mode; cache on disk {size_gb:.2f} GB ({cache_dir})")
    print(f"{'mode':<12} {'load s':>8} {'anon GB loaded':>15} {'anon GB end':>12} {'file GB end':>12} {'batch ms':>9}")
    for r in rows:
        print(f"{r['mode']:<12} {r['load_s']:8.1f} {r['anon_loaded_gb']:15.2f} {r['anon_end_gb']:12.2f} "
              f"{r['file_end_gb']:12.2f} {1000 * r['batch_s']:9.1f}")
    if args.cache_dir is None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
