"""Inference benchmark on a GPU host: bench_inference.py's rows with device cuda and AMP.

    .venv/bin/python bench/bench_inference_gpu.py [--production] [--cuda-device 0] [--slices 300] [--sw-batch-size 8]

The same synthetic 300 x 512² CT, the same interleaved rows (``baseline``: sw_batch_size 2 and the
dense restore, as before issue 24; ``new``: the node's path), with and without the default
uncertainty, in fresh child processes; on CUDA the Segmenter runs the network under
``torch.autocast(device_type="cuda", dtype=torch.float16)`` (pipeline.inference), and each row also
prints ``torch.cuda.max_memory_allocated``. Without a CUDA device it stops at once with exit
status 2 and says why (nothing is measured on the CPU by this script: use bench_inference.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Exit status when no CUDA device can be used.
NO_CUDA_EXIT = 2


def cuda_problem(device_index: int) -> str | None:
    """Why ``cuda:device_index`` cannot be benchmarked, or None when it can."""
    import torch

    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) was built without CUDA"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no CUDA device or driver on this host"
    count = torch.cuda.device_count()
    if not 0 <= device_index < count:
        return f"--cuda-device {device_index}: this host has {count} CUDA device(s), allowed 0..{count - 1}"
    return None


def bench_args(a: argparse.Namespace) -> list[str]:
    """bench_inference.py's command line for these options (device cuda:N)."""
    out = ["--device", f"cuda:{a.cuda_device}", "--slices", str(a.slices), "--slice-mm", str(a.slice_mm),
           "--threads", str(a.threads), "--sw-batch-size", str(a.sw_batch_size), "--repeats", str(a.repeats)]
    if a.production:
        out.append("--production")
    if a.bundle:
        out += ["--bundle", a.bundle]
    if a.json:
        out += ["--json", str(a.json)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--production", action="store_true", help="also time the paper's ViT-B UNETR")
    parser.add_argument("--cuda-device", type=int, default=0)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--slice-mm", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (preprocessing, restore)")
    parser.add_argument("--sw-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    problem = cuda_problem(a.cuda_device)
    if problem is not None:
        print(f"bench_inference_gpu: needs a CUDA device: {problem}. On a CPU host run bench/bench_inference.py.",
              file=sys.stderr)
        return NO_CUDA_EXIT
    import torch

    print(f"GPU: {torch.cuda.get_device_name(a.cuda_device)}; AMP: torch.autocast(cuda, float16) in the Segmenter")
    from bench import bench_inference

    return bench_inference.main(bench_args(a))


if __name__ == "__main__":
    raise SystemExit(main())
