"""The frozen Linears' matmuls of Klein at 1024² in bf16 and through torch._scaled_mm (fp8 e4m3, row-wise or
tensor-wise scales), operands quantized beforehand: what the tensor cores give each, in TFLOP/s.

    python benchmarks/fp8_matmul_bench.py --variant 4b --jsonl out.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VARIANTS = {"4b": (3072, 9216), "9b": (4096, 12288)}  # hidden, mlp hidden (3 · hidden)
TOKENS = 4096 + 512


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _kernels(x: torch.Tensor, w: torch.Tensor) -> dict:
    """The three ways of computing x wᵀ, operands prepared outside the timed call."""
    fp8 = torch.float8_e4m3fn
    xq, wq = x.to(fp8), w.to(fp8)
    one = torch.ones((), device="cuda")
    rows, cols = torch.ones(x.shape[0], 1, device="cuda"), torch.ones(1, w.shape[0], device="cuda")
    return {
        "bf16": lambda: x @ w.t(),
        "fp8_tensor": lambda: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16),
        "fp8_rowwise": lambda: torch._scaled_mm(xq, wq.t(), rows, cols, out_dtype=torch.bfloat16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="4b")
    parser.add_argument("--jsonl", type=Path, default=None)
    args = parser.parse_args()
    h, m = VARIANTS[args.variant]
    shapes = {"qkv": (h, 3 * h), "proj": (h, h), "mlp.0": (h, 2 * m), "mlp.2": (m, h)}
    shapes |= {"linear1": (h, 3 * h + 2 * m), "linear2": (h + m, h)}
    for name, (k, n) in shapes.items():
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        flops = 2 * TOKENS * k * n
        row = {"variant": args.variant, "linear": name, "m": TOKENS, "k": k, "n": n}
        for label, fn in _kernels(x, w).items():
            row[f"{label}_tflops"] = round(flops / _time_ms(fn) / 1e9, 1)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
