"""Where the segment stage's peak memory comes from (issue 24: a 1000-slice study within 4 GB).

    .venv/bin/python bench/bench_memory.py [--slices 1000] [--slice-mm 0.535] [--uncertainty tta|off]
        [--threads 2] [--network bundle|light]

Builds the synthetic 512 x 512 x N CT of bench_inference.py (a phantom resampled onto 0.8 mm pixels;
1000 slices of 0.535 mm span the ~535 mm of bench_e2e.py's 1000-slice study), then runs
``Segmenter.segment`` with the demo bundle and the node's default settings in this process, sampling
the resident memory (VmRSS) every 2 ms in a thread. Each step of the stage (the functions that
``pipeline.inference`` and ``pipeline.preprocess`` call: body mask / foreground box, crop + resample,
window, sliding window per sample, entropy, restore, metal, side split, largest components, the
entropy restore, summaries) is wrapped to record the RSS when it starts and its peak while it runs.
Printed: per step, the RSS at start, its peak and peak - start (MiB), and the stage's peak (VmHWM)
beside the RSS before the stage (the loaded CT).

``--no-release`` leaves out the stage's final ``malloc_trim`` (the RSS after the stage shows what it
hands back). ``--network light`` swaps the UNETR for a 1x1x1 convolution with the bundle's classes (same tensor
sizes out of the sliding window, seconds instead of minutes): for iterating on the memory of the
steps around the network; the figures to report are taken with ``bundle``. Figures only.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_inference import synthetic_ct  # noqa: E402


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Steps:
    """RSS at the start and sampled peak of each wrapped call (a thread samples every ``every_s``)."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s = every_s
        self.rows: list[list] = []  # [name, depth, start MiB, peak MiB, seconds]
        self._open: list[list] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            rss = _rss_mib()
            with self._lock:
                for row in self._open:
                    row[3] = max(row[3], rss)

    def __enter__(self) -> "Steps":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, module, name: str, label: str | None = None) -> None:
        original = getattr(module, name)
        steps = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            rss = _rss_mib()
            row = [label or name, len(steps._open), rss, rss, time.perf_counter()]
            with steps._lock:
                steps.rows.append(row)
                steps._open.append(row)
            try:
                result = original(*args, **kwargs)
                if hasattr(result, "__next__"):  # a generator: time each next() as its own row
                    return steps._iterate(result, row[0])
                return result
            finally:
                end = _rss_mib()
                with steps._lock:
                    row[3] = max(row[3], end)
                    row[4] = time.perf_counter() - row[4]
                    steps._open.remove(row)

        setattr(module, name, wrapper)

    def _iterate(self, gen, label: str):
        i = 0
        while True:
            rss = _rss_mib()
            row = [f"{label}[{i}]", len(self._open), rss, rss, time.perf_counter()]
            with self._lock:
                self.rows.append(row)
                self._open.append(row)
            try:
                item = next(gen)
            except StopIteration:
                with self._lock:
                    self._open.remove(row)
                    self.rows.remove(row)
                return
            finally:
                with self._lock:
                    row[3] = max(row[3], _rss_mib())
                    row[4] = time.perf_counter() - row[4]
                    if row in self._open:
                        self._open.remove(row)
            yield item
            i += 1


def _light_network(num_classes: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Conv3d(1, num_classes, 1).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "thighnode_demo"))
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--slice-mm", type=float, default=0.535)
    parser.add_argument("--uncertainty", default="tta", choices=["tta", "off"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--network", default="bundle", choices=["bundle", "light"])
    parser.add_argument("--no-release", action="store_true",
                        help="skip the stage's malloc_trim (release_freed_memory) to see what it hands back")
    a = parser.parse_args(argv)

    import dataclasses

    import torch

    import pipeline.inference as inference
    import pipeline.postprocess as postprocess
    import pipeline.preprocess as preprocess
    from pipeline.bundle import load_bundle
    from pipeline.labels import load_label_table

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    volume = synthetic_ct(a.slices, a.slice_mm)
    print(f"synthetic CT {volume.shape} float32 ({volume.hu.nbytes / 2**20:.0f} MiB), made in "
          f"{time.perf_counter() - t:.0f} s; RSS {_rss_mib():.0f} MiB")
    labels = load_label_table()
    bundle = load_bundle(Path(a.bundle), labels, torch.device("cpu"))
    if a.network == "light":
        bundle = dataclasses.replace(bundle, network=_light_network(labels.num_classes))
    segmenter = inference.Segmenter(bundle, device="cpu", num_threads=a.threads, uncertainty=a.uncertainty,
                                    uncertainty_samples=2)
    print(segmenter.describe())
    if a.no_release:
        inference.release_freed_memory = lambda: False
    steps = Steps()
    for module, names in (
        (inference, ("prepare", "predict_samples", "predict_scores", "voxel_entropy", "restore_probabilities",
                     "_exclude_metal", "split_sides", "keep_largest_components", "restore_labels",
                     "quantise_entropy", "summarise", "bin_counts")),
        (preprocess, ("plan_preprocessing", "foreground_bbox", "resample_image", "window_gamma", "_paste")),
        (postprocess, ("find_midline_x_mm",)),
    ):
        for name in names:
            if hasattr(module, name):
                steps.wrap(module, name)
    before = _rss_mib()
    t = time.perf_counter()
    with steps:
        seg = segmenter.segment(volume)
    wall = time.perf_counter() - t
    print(f"segment: {wall:.1f} s; RSS before {before:.0f} MiB, VmHWM {_rss_mib('VmHWM'):.0f} MiB, "
          f"RSS after {_rss_mib():.0f} MiB (the segmentation holds "
          f"{(seg.label_map.nbytes + seg.side_map.nbytes + (seg.uncertainty.entropy_map_u8.nbytes if seg.uncertainty else 0)) / 2**20:.0f} MiB)")
    print(f"{'step':<32} {'start':>7} {'peak':>7} {'+peak':>7} {'s':>7}   (MiB RSS)")
    for name, depth, start, peak, seconds in steps.rows:
        print(f"{'  ' * depth + name:<32} {start:7.0f} {peak:7.0f} {peak - start:+7.0f} {seconds:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
