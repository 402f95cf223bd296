"""ONNX Runtime against PyTorch for the production UNETR's sliding-window batch (issue 24: "an inference
runtime such as ONNX Runtime or OpenVINO if a registry package serves it and it is faster here").

    pip install onnxruntime onnx        # not a project dependency: only this benchmark imports them
    .venv/bin/python bench/bench_onnx.py [--threads 2] [--rounds 4]

Exports the paper's ViT-B UNETR (96³ patches, random weights: speed does not depend on them) to ONNX,
checks that ONNX Runtime gives the same logits (max |difference|, argmax agreement), then times one
batch of two windows (the node's ``sw_batch_size``) with PyTorch float32 (the baseline), PyTorch
bfloat16 autocast (what the node runs where the CPU has bf16) and ONNX Runtime float32 (all graph
optimisations), interleaved round by round so that a busy machine slows each alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.labels import load_label_table
from pipeline.network import PRODUCTION_NETWORK, build_network


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    a = parser.parse_args()
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: pip install onnxruntime onnx (this benchmark only)")
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build_network(PRODUCTION_NETWORK, load_label_table().num_classes).eval()
    x = torch.randn(2, 1, 96, 96, 96)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unetr.onnx"
        torch.onnx.export(net, (x,), str(path), opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = a.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    with torch.inference_mode():
        ref = net(x).numpy()
    out = session.run(None, feed)[0]
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {a.threads} threads")
    print(f"ONNX Runtime vs PyTorch float32: max |logit difference| {abs(out - ref).max():.2e}, "
          f"argmax agreement {(out.argmax(1) == ref.argmax(1)).mean():.6f}")

    def fp32() -> None:
        with torch.inference_mode():
            net(x)

    def bf16() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x)

    runs = {"PyTorch float32 (baseline)": fp32, "PyTorch bfloat16 (the node)": bf16,
            "ONNX Runtime float32": lambda: session.run(None, feed)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for f in runs.values():
        f()  # warm-up
    for _ in range(a.rounds):
        for name, f in runs.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["PyTorch float32 (baseline)"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<28} {med:6.2f} s per batch of 2 windows (96³), {med / base:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
