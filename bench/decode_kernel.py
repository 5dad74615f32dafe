"""The CPU decode-attention kernels: ``paged_decode`` against memory bandwidth, and
``attend_prefix_levels`` (shared prefix levels read once for the rows below them) against reading
the same contexts row by row.

    python bench/decode_kernel.py [--baseline OLD.cpp] [--reps 15] [--threads N]

Each case builds random K/V pools for several layers (so one call's K/V is not in cache from the
call before, as in a real step over 30 layers) with block ids scattered over each pool like a
long-running pool's (one case also with each row's blocks adjacent, as the block manager places
them where it can), times the kernel and prints the effective bandwidth: unique K/V bytes read
per call / seconds. Unique bytes count every (block, slot) position some row attends once, so a
prefix shared by a group of rows counts once, as DRAM traffic would (its other reads hit cache).
The bandwidth peer, measured in the same run, is ``torch.sum`` over a float32 array far larger
than the last-level cache, on the same threads (bytes read / seconds).

``--baseline`` builds another version of ``paged_decode.cpp`` (e.g. the previous commit's, copied
outside the repository) under its own name and times both, repetitions interleaved so that
other load on the machine falls on both alike; medians are reported. The baseline must take the
kernels' present arguments (since the sliding window: ``window`` and ``softcap`` last, 0 here).

The level cases are the decode steps of ``bench/workloads.py``'s shared-prefix jobs: each row's
own part (its question) goes through ``paged_decode`` either way; "row by row" reads each row's
whole context with it, "levels" reads its own blocks with it and the levels with
``attend_prefix_levels``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import machine, table

from prefixbatch.execution.attention.native import SOURCES, DecodeKernels
from prefixbatch.execution.native_build import build_extension

NONE = torch.zeros(0, dtype=torch.int64)  # level starts and row positions, read with a window

BLOCK = 16
KV_HEADS, GROUP, DIM = 3, 3, 64  # SmolLM2-135M: 9 query heads over 3 KV heads, head_dim 64
LAYERS = 8  # pools cycled through: all but the B=2 case read more than the L3 between reuses


@dataclass
class Case:
    name: str
    lengths: list[int]
    tables: torch.Tensor  # (B, NB) int64
    unique_tokens: int  # distinct (block, slot) positions attended


def make_case(
    name: str,
    rng: random.Random,
    num_blocks: int,
    lengths: list[int],
    groups: list[int],
    adjacent: bool = False,
) -> Case:
    """Rows with the given lengths; ``groups`` splits them into runs of neighbours that share
    their first ``prefix`` blocks (a run of 1 shares nothing). Blocks are drawn at random from a
    pool of ``num_blocks``, or with ``adjacent`` in order (each row's blocks one run, as the
    block manager places them when it can)."""
    free = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id
    if not adjacent:
        rng.shuffle(free)
    tables: list[list[int]] = []
    row = 0
    for size in groups:
        members = lengths[row : row + size]
        prefix = min(members) // BLOCK if size > 1 else 0
        shared = [free.pop() for _ in range(prefix)]
        for n in members:
            tables.append(shared + [free.pop() for _ in range(-(-n // BLOCK) - prefix)])
        row += size
    widest = max(map(len, tables))
    padded = torch.tensor([t + [t[0]] * (widest - len(t)) for t in tables])
    positions = {(blk, s) for t, n in zip(tables, lengths) for i, blk in enumerate(t)
                 for s in range(min(BLOCK, n - i * BLOCK))}  # fmt: skip
    return Case(name, lengths, padded, len(positions))


def cases(rng: random.Random, num_blocks: int) -> list[Case]:
    def lens(b: int, lo: int, hi: int) -> list[int]:
        return [rng.randint(lo, hi) for _ in range(b)]

    def groups(b: int) -> list[int]:
        out: list[int] = []
        while sum(out) < b:
            out.append(min(rng.randint(4, 8), b - sum(out)))
        return out

    return [
        make_case("B=64 ctx 250-410", rng, num_blocks, lens(64, 250, 410), [1] * 64),
        make_case(
            "B=64 ctx 250-410, adjacent", rng, num_blocks, lens(64, 250, 410), [1] * 64, True
        ),
        make_case("B=256 ctx 100-600", rng, num_blocks, lens(256, 100, 600), [1] * 256),
        make_case("B=32 ctx 1500-2000", rng, num_blocks, lens(32, 1500, 2000), [1] * 32),
        make_case("B=64 shared prefix ~300", rng, num_blocks, lens(64, 300, 420), groups(64)),
        make_case("B=2 ctx 2000 (split; in L3)", rng, num_blocks, lens(2, 2000, 2000), [1] * 2),
    ]


@dataclass
class LevelCase:
    name: str
    full: tuple[torch.Tensor, torch.Tensor]  # (B, NB) tables and (B,) lengths, whole contexts
    own: tuple[torch.Tensor, torch.Tensor]  # the same for each row's own part
    levels: tuple[torch.Tensor, ...]  # level tables, lengths, row_ptr, rows


def padded(tables: list[list[int]]) -> torch.Tensor:
    widest = max(map(len, tables))
    return torch.tensor([t + [t[0]] * (widest - len(t)) for t in tables])


def level_case(
    name: str, rng: random.Random, num_blocks: int, top: int, subs: list[tuple[int, int]]
) -> LevelCase:
    """One level of ``top`` blocks over every row (none if 0), below it sub-levels of
    (blocks, rows) each; every row then has 10-60 tokens of its own."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    top_blocks = [free.pop() for _ in range(top)]
    level_blocks = [top_blocks] if top else []
    level_rows: list[list[int]] = [[]] if top else []
    full, full_len, own, own_len = [], [], [], []
    for blocks, rows in subs:
        sub = [free.pop() for _ in range(blocks)]
        level_blocks.append(sub)
        level_rows.append([])
        for _ in range(rows):
            n = rng.randint(10, 60)
            mine = [free.pop() for _ in range(-(-n // BLOCK))]
            for lv in ([0] if top else []) + [len(level_blocks) - 1]:
                level_rows[lv].append(len(own))
            full.append(top_blocks + sub + mine)
            full_len.append((top + blocks) * BLOCK + n)
            own.append(mine)
            own_len.append(n)
    ptr = [0]
    for r in level_rows:
        ptr.append(ptr[-1] + len(r))
    levels = (
        padded(level_blocks),
        torch.tensor([len(b) * BLOCK for b in level_blocks]),
        torch.tensor(ptr),
        torch.tensor([r for rows in level_rows for r in rows]),
    )
    return LevelCase(
        name,
        (padded(full), torch.tensor(full_len)),
        (padded(own), torch.tensor(own_len)),
        levels,
    )


def level_cases(rng: random.Random, num_blocks: int) -> list[LevelCase]:
    return [
        level_case("multi-level: 300 > 8 x 400 > 6 rows", rng, num_blocks, 18, [(25, 6)] * 8),
        level_case("document QA: 16 x 500 > 4 rows", rng, num_blocks, 0, [(31, 4)] * 16),
        level_case("few-shot: 12 x 500 > 6 rows", rng, num_blocks, 0, [(31, 6)] * 12),
    ]


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        fn()
        if rep:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bandwidth_peer(reps: int) -> float:
    """GB/s of ``torch.sum`` over 1 GiB of float32."""
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another paged_decode.cpp to compare")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels: dict[str, DecodeKernels] = {}
    for label, source in [("baseline", args.baseline), ("kernel", SOURCES[0])]:
        if source is not None:
            module = build_extension((source.resolve(), *SOURCES[1:]), f"{label} decode kernel")
            assert module is not None, f"{source} did not build"
            kernels[label] = module  # type: ignore[assignment]
    rng = random.Random(0)
    torch.manual_seed(0)
    num_blocks = 12288  # room for the largest case (256 rows of <= 38 blocks)
    shape = (num_blocks * BLOCK, KV_HEADS, DIM)
    pools = [(torch.randn(shape), torch.randn(shape)) for _ in range(LAYERS)]
    print(machine())
    peer = bandwidth_peer(args.reps)
    print(f"bandwidth peer: torch.sum over 1 GiB, {peer:.1f} GB/s")
    rows = []
    for case in cases(rng, num_blocks):
        b = len(case.lengths)
        q = torch.randn(b, KV_HEADS * GROUP, DIM)
        lengths = torch.tensor(case.lengths)
        times: dict[str, list[float]] = {label: [] for label in kernels}
        for rep in range(args.reps + 1):
            for label, fn in kernels.items():
                start = time.perf_counter()
                for k_pool, v_pool in pools:
                    fn.paged_decode(
                        q, k_pool, v_pool, case.tables, lengths, BLOCK, DIM**-0.5, 0, 0.0
                    )
                if rep:  # the first repetition warms up
                    times[label].append((time.perf_counter() - start) / LAYERS)
        unique = case.unique_tokens * KV_HEADS * DIM * 4 * 2
        row: dict[str, str] = {"case": case.name, "unique K/V MB": f"{unique / 1e6:.1f}"}
        for label, t in times.items():
            gbs = unique / statistics.median(t) / 1e9
            row[f"{label} ms"] = f"{1000 * statistics.median(t):.3f}"
            row[f"{label} GB/s"] = f"{gbs:.1f} ({gbs / peer:.0%})"
        rows.append(row)
    print(table(rows))
    print(f"GB/s: unique K/V bytes per call / median s per call; (%): of the {peer:.1f} GB/s peer")
    k = kernels["kernel"]
    scale = DIM**-0.5
    rows = []
    for lc in level_cases(rng, num_blocks):
        q = torch.randn(len(lc.own[1]), KV_HEADS * GROUP, DIM)

        def row_by_row(lc: LevelCase = lc, q: torch.Tensor = q) -> None:
            for k_pool, v_pool in pools:
                k.paged_decode(q, k_pool, v_pool, *lc.full, BLOCK, scale, 0, 0.0)

        def levels(lc: LevelCase = lc, q: torch.Tensor = q) -> None:
            for k_pool, v_pool in pools:
                out, lse = k.paged_decode(q, k_pool, v_pool, *lc.own, BLOCK, scale, 0, 0.0)
                k.attend_prefix_levels(
                    q, k_pool, v_pool, out, lse, *lc.levels, BLOCK, scale, NONE, NONE, 0, 0.0
                )

        plain, shared = (median_ms(f, args.reps) / LAYERS for f in (row_by_row, levels))
        rows.append(
            {
                "decode step (one layer)": lc.name,
                "rows": len(q),
                "row by row ms": f"{plain:.3f}",
                "levels ms": f"{shared:.3f}",
                "speed-up": f"{plain / shared:.2f}x",
            }
        )
    print(table(rows))


if __name__ == "__main__":
    main()
