"""The CPU GEMM paths for the default model's projections, side by side: ``F.linear`` (MKL, what
transformers runs), the oneDNN-packed weight prefixbatch uses on the CPU, and ``torch.mm``
against a pre-transposed weight. GFLOP/s per (rows, projection), median of interleaved
repetitions, so the paths see the same machine state.

    python bench/gemm_paths.py [--rows 1,16,64,256,1024]

Shapes are SmolLM2-135M's (hidden 576): qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576, lm_head 576->49152 (up to 64 rows: only sampled rows reach it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import machine, table

SHAPES = {
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}


def gflops(fns: dict[str, Callable[[], object]], flop: float, rounds: int = 7) -> dict[str, float]:
    """Median GFLOP/s of each function, repetitions interleaved round by round."""
    reps = max(3, int(3e9 / flop))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - start) / reps)
    return {k: flop / statistics.median(v) / 1e9 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,16,64,256,1024")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    out = []
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            for name, (k, n) in SHAPES.items():
                if name == "lm_head" and rows > 64:
                    continue
                w, x = torch.randn(n, k), torch.randn(rows, k)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
                wt = w.t().contiguous()
                res = gflops(
                    {
                        "F.linear": lambda x=x, w=w: F.linear(x, w),
                        "oneDNN packed": lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(
                            x, p, None, "none", [], ""
                        ),
                        "mm, weight transposed": lambda x=x, wt=wt: torch.mm(x, wt),
                    },
                    2.0 * rows * k * n,
                )
                row: dict[str, object] = {"rows": rows, "projection": name}
                row.update({f"{p} GFLOP/s": f"{g:.0f}" for p, g in res.items()})
                row["packed / F.linear"] = f"{res['oneDNN packed'] / res['F.linear']:.2f}x"
                out.append(row)
    print(table(out))


if __name__ == "__main__":
    main()
