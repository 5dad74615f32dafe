"""The fused element-wise CPU kernels against the plain PyTorch ops they replace, per call, at
SmolLM2-135M shapes (hidden 576, 9 heads, 3 KV heads, head size 64, intermediate 1536).

    python bench/fused_ops.py [--rows 64 1024] [--reps 15]

Plain and fused runs alternate within each repetition so load from other work on the machine
falls on both; the table gives each side's median microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import machine, table

from prefixbatch.config import RopeConfig
from prefixbatch.execution.fused_ops import FusedKernels, fused_kernels
from prefixbatch.execution.host_memory import keep_freed_memory
from prefixbatch.execution.layers import RotaryEmbedding, apply_rope, rms_norm, silu_and_mul

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, EPS = 576, 9, 3, 64, 1536, 1e-5


def cases(t: int, k: FusedKernels) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Op name -> (plain call, fused call) on fresh inputs of ``t`` rows."""
    x, residual, weight = torch.randn(t, HIDDEN), torch.randn(t, HIDDEN), torch.randn(HIDDEN)
    gate_up = torch.randn(t, 2 * INTERMEDIATE)
    qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q_, k_, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q, kk = q_.view(t, HEADS, HEAD_DIM), k_.view(t, KV_HEADS, HEAD_DIM)
    cos, sin = RotaryEmbedding(RopeConfig(theta=1e5), HEAD_DIM).cos_sin(
        torch.arange(t), torch.float32
    )
    return {
        "add + RMSNorm": (
            lambda: rms_norm(x + residual, weight, EPS),
            lambda: k.fused_add_rms_norm_(x, residual, weight, EPS),
        ),
        "RMSNorm": (lambda: rms_norm(x, weight, EPS), lambda: k.rms_norm(x, weight, EPS)),
        "SiLU and mul": (lambda: silu_and_mul(gate_up), lambda: k.silu_and_mul(gate_up)),
        "rope (q and k)": (
            lambda: (apply_rope(q, cos, sin), apply_rope(kk, cos, sin)),
            lambda: k.rotary_embedding_(q, kk, cos, sin),
        ),
    }


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    print(f"machine: {machine()}, torch threads: {torch.get_num_threads()}")
    # As in the engine: freed buffers stay in the process, so the plain ops' allocations do not
    # page-fault (without this their 1024-row times swing 3-5x from run to run).
    keep_freed_memory()
    kernels = fused_kernels()
    assert kernels is not None, "the kernels did not build"
    rows = []
    with torch.inference_mode():
        for t in args.rows:
            calls = max(10, 20000 // t)
            for name, (plain, fused) in cases(t, kernels).items():
                times: dict[str, list[float]] = {"plain": [], "fused": []}
                for _ in range(args.reps):
                    times["plain"].append(per_call_us(plain, calls))
                    times["fused"].append(per_call_us(fused, calls))
                p, f = (statistics.median(times[s]) for s in ("plain", "fused"))
                rows.append(
                    {
                        "rows": t,
                        "op": name,
                        "plain us": f"{p:.1f}",
                        "fused us": f"{f:.1f}",
                        "speedup": f"{p / f:.1f}x",
                    }
                )
    print(table(rows))


if __name__ == "__main__":
    main()
