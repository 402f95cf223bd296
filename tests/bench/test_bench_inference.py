"""The CPU-only parts of bench/bench_inference.py and bench/bench_inference_gpu.py."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import bench_inference, bench_inference_gpu  # noqa: E402


def test_agreement_counts_voxels_and_dice_per_label() -> None:
    a = np.array([[0, 1, 1, 2], [2, 2, 0, 0]], dtype=np.uint8)
    b = np.array([[0, 1, 2, 2], [2, 2, 0, 1]], dtype=np.uint8)
    same, dice = bench_inference.agreement(a, b, 4)
    assert same == pytest.approx(6 / 8)
    assert dice == pytest.approx({1: 2 * 1 / (2 + 2), 2: 2 * 3 / (3 + 4)})  # label 3 in neither: no entry


def test_gpu_bench_passes_its_options_to_the_cpu_bench() -> None:
    a = argparse.Namespace(cuda_device=1, slices=120, slice_mm=3.0, threads=4, sw_batch_size=16, repeats=2,
                           production=True, bundle="b", json=Path("x.json"))
    args = bench_inference_gpu.bench_args(a)
    assert args[:2] == ["--device", "cuda:1"]
    assert ["--slices", "120"] == args[2:4] and "--production" in args and args[-2:] == ["--json", "x.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the benchmark would run")
def test_gpu_bench_stops_with_a_clear_message_without_cuda() -> None:
    assert bench_inference_gpu.cuda_problem(0) is not None
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_inference_gpu.py")], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == bench_inference_gpu.NO_CUDA_EXIT
    assert "needs a CUDA device" in proc.stderr and "bench_inference.py" in proc.stderr
    assert proc.stdout == ""
