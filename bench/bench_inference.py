"""Inference benchmark: our Segmenter against plain MONAI sliding-window inference.

    .venv/bin/python bench/bench_inference.py [--bundle bundles/thighnode_demo] [--production]
        [--device cpu|cuda|auto] [--slices 300] [--slice-mm 1.5] [--threads N]

A synthetic 512x512xN CT (0.8 mm pixels, 1.5 mm slices by default) is made by resampling a
phantom (modelkit.phantom) onto that grid. For each model (the demo bundle; with
``--production`` also the paper's UNETR ViT-B, 96³ patches, random weights, 1.5 mm grid) it
measures, each in a fresh child process so that peak figures are not mixed:

* ``segmenter``: Segmenter.segment end to end (canonicalise, preprocess, sliding window with
  overlap 0.5 / gaussian / sw_batch_size 2 / inference_mode (+AMP on CUDA), linear restore to
  the 512x512xN grid, side split, largest components);
* ``ours-sw``: only our sliding-window call on the preprocessed input;
* ``segmenter-tta``: the same with the node's default uncertainty (``[model] uncertainty = "tta"``, 2
  test-time augmentation samples: identity and mirror) - the added time per study of the uncertainty;
* ``baseline-sw``: plain ``monai.inferers.sliding_window_inference`` with its defaults
  (overlap 0.25, mode constant, sw_batch_size 1) under ``torch.no_grad`` only, on the same
  preprocessed input (without no_grad autograd would keep every window's activations).

Reported: wall time, peak RSS of the child (resource.getrusage ru_maxrss), numpy peak
(tracemalloc) and, on CUDA, torch.cuda.max_memory_allocated; and the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def synthetic_ct(slices: int, slice_mm: float, pixel_mm: float = 0.8, size: int = 512):
    """A phantom resampled to (slices, size, size) with HFS orientation; returns a Volume."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from modelkit.phantom import PhantomParams, generate_phantom
    from pipeline.types import Volume

    ph = generate_phantom(PhantomParams(seed=99, spacing_mm=(2.0, 2.0, 2.0)))
    src = np.asarray(ph.affine_lps, dtype=np.float64)
    dst = np.zeros((4, 4))
    dst[3, 3] = 1
    dst[:3, 0] = (0, 0, slice_mm)
    dst[:3, 1] = (0, pixel_mm, 0)
    dst[:3, 2] = (pixel_mm, 0, 0)
    centre_src = src @ np.r_[(np.array(ph.hu.shape) - 1) / 2, 1]
    dst[:3, 3] = centre_src[:3] - dst[:3, :3] @ ((np.array([slices, size, size]) - 1) / 2)
    # normalised sampling grid of the phantom for every target voxel, slab by slab
    m = np.linalg.inv(src) @ dst
    src_shape = np.array(ph.hu.shape, dtype=np.float64)
    volume = torch.from_numpy(np.ascontiguousarray(ph.hu))[None, None]
    out = np.empty((slices, size, size), dtype=np.float32)
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for k in range(slices):
        idx = m[:3, 0:1] * k + m[:3, 1:2] * r.ravel() + m[:3, 2:3] * c.ravel() + m[:3, 3:4]
        norm = 2 * (idx + 0.5) / src_shape[:, None] - 1  # align_corners=False
        grid = torch.from_numpy(norm[::-1].T.reshape(1, 1, size, size, 3).astype(np.float32))
        out[k] = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0, 0].numpy()
    outside = (out < -900)
    out[outside] = -1000.0
    return Volume(hu=out, affine_lps=dst, frame_of_reference_uid="1.2.3", study_instance_uid="1.2.4",
                  series_instance_uid="1.2.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=())


def _child(kind: str, model: str, args: dict, queue) -> None:
    import numpy as np
    import torch

    from pipeline.bundle import Bundle, SlidingWindowSettings, load_bundle
    from pipeline.inference import Segmenter, predict_scores, select_device
    from pipeline.labels import load_label_table
    from pipeline.network import PRODUCTION_NETWORK, build_network
    from pipeline.preprocess import PreprocessSettings, prepare

    torch.set_num_threads(args["threads"])
    device = select_device(args["device"])
    labels = load_label_table()
    if model == "demo":
        bundle = load_bundle(Path(args["bundle"]), labels, device)
    else:
        torch.manual_seed(0)
        net = build_network(PRODUCTION_NETWORK, labels.num_classes).to(device).eval()
        bundle = Bundle("production-random", "0", labels, net, PRODUCTION_NETWORK,
                        PreprocessSettings(spacing_mm=(1.5, 1.5, 1.5)), SlidingWindowSettings(), Path("."), {})
    volume = synthetic_ct(args["slices"], args["slice_mm"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    windows = None
    if kind in ("segmenter", "segmenter-tta"):
        tta = {"uncertainty": "tta", "uncertainty_samples": 2} if kind == "segmenter-tta" else {}
        seg = Segmenter(bundle, device=str(device), num_threads=args["threads"], **tta).segment(volume)
        shape = seg.label_map.shape
    else:
        image, plan = prepare(volume.hu, volume.affine_lps, bundle.preprocess_settings)
        tracemalloc.reset_peak()
        started = time.perf_counter()
        roi = bundle.network_settings.img_size
        if kind == "ours-sw":
            out = predict_scores(bundle.network, image, roi, device, sw_batch_size=2, overlap=0.5, mode="gaussian")
        else:
            from monai.inferers import sliding_window_inference

            x = torch.from_numpy(image)[None].to(device)
            with torch.no_grad():
                out = sliding_window_inference(x, roi, 1, bundle.network)
        shape = tuple(out.shape)
        windows = plan.model_shape
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    _, np_peak = tracemalloc.get_traced_memory()
    queue.put({
        "kind": kind, "model": model, "device": str(device), "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before / 1024,
        "numpy_peak_mb": np_peak / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "output_shape": list(shape), "model_grid": list(windows) if windows else None,
    })


def run(kind: str, model: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, model, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "thighnode_demo"))
    parser.add_argument("--production", action="store_true", help="also time the paper's ViT-B UNETR (slow on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--slice-mm", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    args = {"bundle": a.bundle, "device": a.device, "slices": a.slices, "slice_mm": a.slice_mm, "threads": a.threads}
    models = ["demo"] + (["production"] if a.production else [])
    results = []
    print(f"synthetic CT {a.slices}x512x512, 0.8 mm pixels, {a.slice_mm} mm slices; device {a.device}, {a.threads} threads")
    for model in models:
        rows = {kind: run(kind, model, args) for kind in ("segmenter", "segmenter-tta", "ours-sw", "baseline-sw")}
        base = rows["baseline-sw"]["wall_s"]
        for kind, r in rows.items():
            cuda = f", cuda peak {r['cuda_peak_mb']:.0f} MB" if r["cuda_peak_mb"] is not None else ""
            print(f"{model:>10} {kind:<12} {r['wall_s']:8.1f} s  ({r['wall_s'] / base:5.2f}x baseline)  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB, numpy peak {r['numpy_peak_mb']:6.0f} MB{cuda}")
        added = rows["segmenter-tta"]["wall_s"] - rows["segmenter"]["wall_s"]
        print(f"{model:>10} uncertainty (tta x2) adds {added:.1f} s per study "
              f"({rows['segmenter-tta']['wall_s'] / rows['segmenter']['wall_s']:.2f}x the segment stage)")
        results.extend(rows.values())
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
