"""Stage 2 of the GPU check: the Triton attention kernels at the 8B job's shapes, each timed
with ``triton.testing.do_bench`` (median over repeated launches) on CUDA, once on the CPU.

Cases (``gpu_common.KernelShapes``; the GPU's figures in brackets):

- prefix levels: the prefix-level kernel alone, L levels x R decode rows x P keys [8 and 64 x
  16 x 2,000], with the split-KV count the backend picks and unsplit;
- decode below levels: a whole decode step's attention as batchllm runs it (levels, then each
  row's own O keys [250]);
- decode, whole context: the same rows reading all P + O keys each, no levels (fcfs-lru);
- prefill: S sequences x N new tokens, causal [4 x 2,048];
- store: the K/V rows of a step written into the paged pool [8,192].

GB/s counts the K/V read (a level's once, a row's own once per row) plus the queries read and
the outputs written; TFLOP/s counts 4 x rows x heads x keys x head_dim (QK and PV; a causal
prefill counts its lower triangle).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from gpu_common import KernelShapes, Recorder, Sizes

from prefixbatch.execution.attention.kv_splits import KVSplits
from prefixbatch.execution.attention.step import AttentionStep, PrefixLevel, SeqStep
from prefixbatch.execution.attention.triton_backend import TritonBackend
from prefixbatch.execution.attention.triton_launch import (
    prefix_partials,
    triton_attention,
    write_kv,
)
from prefixbatch.execution.kv_cache import KVCache


def bench_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA (warm-up and L2 flush included), one
    timed call on the CPU (the interpreter: the path runs, its time means nothing)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


class Workspace:
    """One layer's paged pool filled with random K/V and a backend over it; hands out blocks
    in a shuffled order (scattered, as a running engine's are)."""

    def __init__(self, shapes: KernelShapes, blocks: int, dtype: torch.dtype, device: str) -> None:
        self.shapes = shapes
        self.cache = KVCache(
            1, blocks, shapes.block_size, shapes.kv_heads, shapes.head_dim, dtype, device
        )
        self.cache.k.normal_()
        self.cache.v.normal_()
        self.backend = TritonBackend(self.cache, shapes.heads, shapes.head_dim**-0.5)
        self.free = list(range(blocks))
        random.Random(0).shuffle(self.free)

    def blocks(self, positions: int) -> tuple[int, ...]:
        n = -(-positions // self.shapes.block_size)
        taken, self.free = self.free[:n], self.free[n:]
        return tuple(taken)

    def query(self, rows: int) -> torch.Tensor:
        s = self.shapes
        return torch.randn(rows, s.heads, s.head_dim, dtype=self.cache.k.dtype, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.cache.k.device


def decode_step(ws: Workspace, levels: int) -> AttentionStep:
    """``levels`` x rows_per_level decode rows, each below a level of prefix_len keys and with
    own_len keys of its own, read through the levels."""
    s = ws.shapes
    seqs, lvls = [], []
    for _ in range(levels):
        prefix = ws.blocks(s.prefix_len)
        first = len(seqs)
        for _ in range(s.rows_per_level):
            table = prefix + ws.blocks(s.own_len)
            seqs.append(SeqStep(len(seqs), 1, s.prefix_len + s.own_len, table, s.prefix_len))
        lvls.append(PrefixLevel(0, s.prefix_len, prefix, first, len(seqs) - first, first,
                                len(seqs), 0))  # fmt: skip
    return AttentionStep.of(seqs, lvls, len(seqs), s.block_size)


def read_whole(step: AttentionStep) -> AttentionStep:
    """The same rows reading their whole context (the same blocks), no levels: fcfs-lru's."""
    seqs = tuple(replace(seq, shared_len=0) for seq in step.seqs)
    return AttentionStep.of(seqs, (), step.num_rows, step.block_size)


def prefill_step(ws: Workspace) -> AttentionStep:
    n_seqs, tokens = ws.shapes.prefill
    seqs = tuple(SeqStep(i * tokens, tokens, tokens, ws.blocks(tokens)) for i in range(n_seqs))
    return AttentionStep.of(seqs, (), n_seqs * tokens, ws.shapes.block_size)


def pool_blocks(s: KernelShapes) -> int:
    """Blocks every case's step takes (each gets its own)."""
    per_level = -(-s.prefix_len // s.block_size)
    per_row = -(-s.own_len // s.block_size)
    decode = sum(n * per_level + n * s.rows_per_level * per_row for n in s.levels)
    n_seqs, tokens = s.prefill
    return decode + n_seqs * -(-tokens // s.block_size)


def kernel_row(
    case: str, ms: float, moved: float, flops: float, splits: KVSplits | None = None
) -> dict[str, Any]:
    row: dict[str, Any] = {"check": "kernel", "case": case}
    if splits is not None:
        row["splits"] = f"{splits.prefix}/{splits.own}"
    return row | {  # three significant digits
        "ms": float(f"{ms:.3g}"),
        "gb_s": float(f"{moved / ms / 1e6:.3g}"),
        "tflop_s": float(f"{flops / ms / 1e9:.3g}"),
    }


def run(sizes: Sizes, rec: Recorder) -> None:
    """Stage 2: every case at every size, one row each (a failed case records its error)."""
    s = sizes.kernels
    dtype = getattr(torch, sizes.dtype)
    elem = torch.finfo(dtype).bits // 8
    per_key = 2 * s.kv_heads * s.head_dim * elem  # K and V of one position
    q_row = s.heads * s.head_dim * elem
    ws = Workspace(s, pool_blocks(s), dtype, sizes.device)
    if sizes.device == "cpu":
        ws.backend.target_programs = 16  # the interpreter: split as a small device would
    scale = s.head_dim**-0.5
    k_pool, v_pool = ws.cache.k[0], ws.cache.v[0]

    def attention(meta: Any, q: torch.Tensor, splits: KVSplits) -> Callable[[], object]:
        return lambda: triton_attention(q, k_pool, v_pool, meta, scale, splits)

    def partials(meta: Any, q: torch.Tensor, splits: int) -> Callable[[], object]:
        return lambda: prefix_partials(q, k_pool, v_pool, meta, scale, splits)

    def case(name: str, fn: Callable[[], object], moved: float, flops: float,
             splits: KVSplits | None = None) -> None:  # fmt: skip
        def measure() -> dict[str, Any]:
            return kernel_row(name, bench_ms(fn, ws.device), moved, flops, splits)

        rec.attempt(name, measure)

    for levels in s.levels:
        rows = levels * s.rows_per_level
        shape = f"{levels} levels x {s.rows_per_level} rows"
        step = decode_step(ws, levels)
        meta, whole = ws.backend.prepare(step), ws.backend.prepare(read_whole(step))
        q = ws.query(rows)
        level_kv = levels * s.prefix_len * per_key
        level_flops = 4.0 * rows * s.heads * s.prefix_len * s.head_dim
        auto = ws.backend.splits(meta)
        for n in dict.fromkeys([auto.prefix, 1]):  # the backend's split count, then none
            out = rows * s.heads * (s.head_dim + 1) * 4 * n  # fp32 partials and lse
            case(
                f"prefix levels, {shape} x {s.prefix_len} keys",
                partials(meta, q, n),
                level_kv + rows * q_row + out,
                level_flops,
                KVSplits(n, 1),
            )
        own_flops = 4.0 * rows * s.heads * s.own_len * s.head_dim
        case(
            f"decode below levels, {shape}, {s.own_len} own keys",
            attention(meta, q, auto),
            level_kv + rows * (s.own_len * per_key + 2 * q_row),
            level_flops + own_flops,
            auto,
        )
        keys = s.prefix_len + s.own_len
        case(
            f"decode, whole context, {rows} rows x {keys} keys",
            attention(whole, q, ws.backend.splits(whole)),
            rows * (keys * per_key + 2 * q_row),
            level_flops + own_flops,
            ws.backend.splits(whole),
        )
    n_seqs, tokens = s.prefill
    prefill = ws.backend.prepare(prefill_step(ws))
    case(
        f"prefill, {n_seqs} x {tokens} tokens, causal",
        attention(prefill, ws.query(n_seqs * tokens), ws.backend.splits(prefill)),
        n_seqs * tokens * (per_key + 2 * q_row),
        4.0 * n_seqs * s.heads * s.head_dim * tokens * (tokens + 1) / 2,
    )
    t = s.store_tokens
    new_kv = torch.randn(t, s.kv_heads, s.head_dim, dtype=dtype, device=ws.device)
    slots = torch.randperm(k_pool.shape[0], device=ws.device)[:t].to(torch.int32)
    case(
        f"store, {t} K/V rows",
        lambda: write_kv(new_kv, new_kv, k_pool, v_pool, slots),
        2 * t * per_key,
        0.0,
    )
