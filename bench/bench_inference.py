"""Inference benchmark: the segment stage against the old path, measured in the same run.

    .venv/bin/python bench/bench_inference.py [--bundle bundles/thighnode_demo] [--production]
        [--device cpu|cuda|auto] [--slices 300] [--slice-mm 1.5] [--threads N] [--repeats 1]

A synthetic 512x512xN CT (0.8 mm pixels, 1.5 mm slices by default) is made by resampling a
phantom (modelkit.phantom) onto that grid. For each model (the demo bundle; with
``--production`` also the paper's UNETR ViT-B, 96³ patches, random weights, 1.5 mm grid) it
measures, each in a fresh child process so that peak figures are not mixed, interleaved
(baseline, new, baseline, new, ...) because the CPU is shared:

* ``new``: ``Segmenter.segment`` as the node runs it (canonicalise, preprocess, sliding window
  overlap 0.5 / gaussian / inference_mode, ``sw_batch_size`` of config/node.toml (2), the restore
  that interpolates scores only at boundary voxels, metal exclusion, side split, largest components);
* ``baseline``: the same stage the way it ran before issue 24: MONAI ``sliding_window_inference``
  in float32 with ``sw_batch_size`` 2 and the dense restore (``restore_probabilities_dense``: all classes
  interpolated at every voxel of the crop);
* each also with the node's default uncertainty (``-tta``: 2 test-time augmentation samples).

Reported per row: wall seconds, CPU seconds of the child (user + system: less sensitive to the
other work on a shared machine than wall time), peak RSS, the ratio to the baseline and the
target; and the voxel agreement and per-structure Dice of the new labels against the baseline's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
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

    import pipeline.inference as inference
    from pipeline.bundle import Bundle, SlidingWindowSettings, load_bundle
    from pipeline.inference import Segmenter, select_device
    from pipeline.labels import load_label_table
    from pipeline.network import PRODUCTION_NETWORK, build_network
    from pipeline.preprocess import PreprocessSettings, restore_probabilities_dense

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
    tta = {"uncertainty": "tta", "uncertainty_samples": 2} if kind.endswith("-tta") else {}
    if kind.startswith("baseline"):
        inference.restore_probabilities = restore_probabilities_dense  # the restore before issue 24
        segmenter = Segmenter(bundle, device=str(device), num_threads=args["threads"], sw_batch_size=2,
                              precision="fp32", **tta)
    else:
        segmenter = Segmenter(bundle, device=str(device), num_threads=args["threads"],
                              sw_batch_size=args["sw_batch_size"], precision=args["precision"], **tta)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    seg = segmenter.segment(volume)
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    np.save(args["out_dir"] / f"{model}-{kind}.npy", seg.label_map)
    queue.put({
        "kind": kind, "model": model, "device": str(device), "wall_s": wall,
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "peak_rss_mb": cpu1.ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "output_shape": list(seg.label_map.shape),
    })


def run(kind: str, model: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, model, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def agreement(a, b, num_classes: int) -> tuple[float, dict[int, float]]:
    """Fraction of voxels with one label, and Dice per label present in either map."""
    import numpy as np

    same = float(np.count_nonzero(a == b)) / a.size
    ca = np.bincount(a.ravel(), minlength=num_classes)
    cb = np.bincount(b.ravel(), minlength=num_classes)
    both = np.bincount(a[a == b].ravel(), minlength=num_classes)
    dice = {lid: 2.0 * both[lid] / (ca[lid] + cb[lid]) for lid in range(1, num_classes) if ca[lid] + cb[lid]}
    return same, dice


#: Targets of issue 24: the end-to-end budget is 30 s for a 299 x 512² study on 2 cores, so the
#: segment stage (with the default uncertainty) gets half of it; production: half of 120.8 s.
TARGET_S = {"demo": 15.0, "production": 60.4}
TARGET_RSS_MB = 2048.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "thighnode_demo"))
    parser.add_argument("--production", action="store_true", help="also time the paper's ViT-B UNETR (slow on CPU)")
    parser.add_argument("--production-only", action="store_true", help="only the ViT-B rows")
    parser.add_argument("--no-tta", action="store_true", help="skip the rows with the default uncertainty")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--slice-mm", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per network call of the new path (the node's default, config/node.toml)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="arithmetic of the new path (default: the bundle's; ViT-B: fp32); the baseline is fp32")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved baseline/new pairs per row")
    a = parser.parse_args(argv)
    import tempfile

    import numpy as np

    from pipeline.labels import load_label_table

    num_classes = load_label_table().num_classes
    out_dir = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    args = {"bundle": a.bundle, "device": a.device, "slices": a.slices, "slice_mm": a.slice_mm, "threads": a.threads,
            "sw_batch_size": a.sw_batch_size, "precision": a.precision, "out_dir": out_dir}
    models = (["demo"] if not a.production_only else []) + (["production"] if a.production or a.production_only else [])
    results = []
    print(f"synthetic CT {a.slices}x512x512, 0.8 mm pixels, {a.slice_mm} mm slices; device {a.device}, "
          f"{a.threads} threads; new path sw_batch_size {a.sw_batch_size}, precision {a.precision or 'bundle'}; "
          f"baseline = MONAI sliding window fp32 "
          f"sw_batch_size 2 + dense restore (before issue 24)")
    for model in models:
        for tta in ("",) if a.no_tta else ("", "-tta"):
            runs = []
            for _ in range(max(1, a.repeats)):
                runs.append((run("baseline" + tta, model, args), run("new" + tta, model, args)))
            results.extend(r for pair in runs for r in pair)
            for base, new in runs:
                for r in (base, new):
                    cuda = f", cuda peak {r['cuda_peak_mb']:.0f} MB" if r["cuda_peak_mb"] is not None else ""
                    print(f"{model:>10} {r['kind']:<12} wall {r['wall_s']:7.1f} s ({r['wall_s'] / base['wall_s']:4.2f}x "
                          f"baseline), CPU {r['cpu_s']:7.1f} s ({r['cpu_s'] / base['cpu_s']:4.2f}x), target "
                          f"<= {TARGET_S[model]:g} s wall; peak RSS {r['peak_rss_mb']:6.0f} MB (target "
                          f"<= {TARGET_RSS_MB:.0f}){cuda}")
            same, dice = agreement(np.load(out_dir / f"{model}-baseline{tta}.npy"),
                                   np.load(out_dir / f"{model}-new{tta}.npy"), num_classes)
            low = sorted(dice.items(), key=lambda kv: kv[1])[:3]
            print(f"{model:>10} labels new vs baseline{tta}: {100 * same:.4f} % of voxels agree; Dice per structure "
                  f"min {min(dice.values()):.4f}, median {float(np.median(list(dice.values()))):.4f} (lowest: "
                  + ", ".join(f"label {k} {v:.4f}" for k, v in low) + ")")
    shutil.rmtree(out_dir, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
