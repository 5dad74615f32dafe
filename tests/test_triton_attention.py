"""The Triton attention kernels against a plain PyTorch reference built from the same
``AttentionStep``: random mixed steps (prefill chunks and decode rows) under up to three nested
prefix levels, GQA 1-8, block sizes 16/32, head_dim 32-128. On the CPU they run under Triton's
interpreter (fp32, fp16; set in conftest); with CUDA the same tests run on the GPU, bf16 too."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from conftest import dense_attention  # noqa: E402
from prefixbatch.execution.attention.backend import LayerAttention  # noqa: E402
from prefixbatch.execution.attention.kv_splits import (  # noqa: E402
    KVSplits,
    busy_tiles,
    choose_splits,
    splits_for,
)
from prefixbatch.execution.attention.reference import attend_lse  # noqa: E402
from prefixbatch.execution.attention.resident_table import ResidentTable  # noqa: E402
from prefixbatch.execution.attention.step import (  # noqa: E402
    AttentionStep,
    PrefixLevel,
    SeqStep,
    TableVersions,
)
from prefixbatch.execution.attention.triton_backend import (  # noqa: E402
    TritonBackend,
    triton_available,
)
from prefixbatch.execution.attention.triton_launch import (  # noqa: E402
    prefix_partials,
    triton_attention,
)
from prefixbatch.execution.attention.triton_metadata import (  # noqa: E402
    MetadataShape,
    TritonMetadata,
)
from prefixbatch.execution.kv_cache import KVCache  # noqa: E402
from prefixbatch.execution.upload import upload  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="the interpreter runs without CUDA")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
]
# Max error relative to the largest output; the reference runs in float64 on the same inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class StepMaker:
    """Random steps over a pool of ``num_blocks`` scattered blocks: a tree of prefix levels (each
    of 1-3 whole blocks, at most ``max_depth`` deep) with sequences below them, laid out depth
    first, plus sequences read as a whole. Each sequence has 0-40 own positions before its new
    tokens, and 1 new token (decode) or a prefill chunk of 2-32."""

    def __init__(self, rng: random.Random, block_size: int, num_blocks: int) -> None:
        self.rng = rng
        self.bs = block_size
        self.free = list(range(num_blocks))
        rng.shuffle(self.free)
        self.seqs: list[SeqStep] = []
        self.levels: list[PrefixLevel] = []
        self.rows = 0

    def blocks(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]

    def seq(self, prefix: list[int], own_before: int | None = None, q_len: int = 0) -> None:
        """A sequence below ``prefix`` blocks; random own positions and new tokens unless given."""
        rng = self.rng
        shared = len(prefix) * self.bs
        before = rng.choice([0, 1, 15, 16, 17, 40]) if own_before is None else own_before
        q_len = q_len or (1 if rng.random() < 0.5 else rng.randrange(2, 33))
        ctx = shared + before + q_len
        table = prefix + self.blocks(-(-(ctx - shared) // self.bs))
        self.seqs.append(SeqStep(self.rows, q_len, ctx, tuple(table), shared))
        self.rows += q_len

    def level(self, depth: int, max_depth: int, prefix: list[int], force_depth: bool) -> None:
        """A level below ``prefix`` and everything under it; ``force_depth`` makes its first
        child a level whenever the depth allows (so the tree reaches ``max_depth``)."""
        rng = self.rng
        own = self.blocks(rng.choice([1, 1, 2, 3]))
        first, row_start = len(self.seqs), self.rows
        for i in range(rng.randrange(1, 4)):
            if i and len(self.seqs) >= 10:  # small steps: the interpreter runs every program
                break
            deeper = depth + 1 < max_depth and (rng.random() < 0.4 or (force_depth and i == 0))
            if deeper:
                self.level(depth + 1, max_depth, prefix + own, force_depth)
            else:
                self.seq(prefix + own)
        start = len(prefix) * self.bs
        self.levels.append(
            PrefixLevel(
                start,
                start + len(own) * self.bs,
                tuple(own),
                first,
                len(self.seqs) - first,
                row_start,
                self.rows,
                depth,
            )
        )

    def step(self) -> AttentionStep:
        return AttentionStep.of(self.seqs, self.levels, self.rows, self.bs)


def random_step(rng: random.Random, block_size: int, max_depth: int = 3) -> AttentionStep:
    maker = StepMaker(rng, block_size, 400)
    for _ in range(rng.randrange(0, 3)):
        maker.seq([])
    for _ in range(rng.randrange(1, 3)):
        maker.level(0, max_depth, [], force_depth=True)
    maker.seq([], q_len=1)  # a decode row and a prefill chunk in every step
    maker.seq([], q_len=23)
    return maker.step()


def random_inputs(
    rng: random.Random, step: AttentionStep, device: str, group: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """fp32 q (T, H, D) and filled pools (slots, KVH, D), ``group`` query heads per KV head;
    the scale."""
    kv_heads = rng.choice([1, 2])
    q = torch.randn(step.num_rows, kv_heads * group, dim, device=device)
    k_pool = torch.randn(400 * step.block_size, kv_heads, dim, device=device)
    v_pool = torch.randn_like(k_pool)
    return q, k_pool, v_pool, dim**-0.5


def max_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double().cpu() - expected).abs().max() / expected.abs().max())


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_mixed_step_matches_reference(seed: int, device: str) -> None:
    """Random mixed steps under nested levels (3 deep), every dtype the device computes."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    step = random_step(rng, (16, 32)[seed % 2])
    assert step.max_depth == 3
    group, dim = (1, 2, 3, 4, 8, 5)[seed], (32, 64, 128)[seed % 3]
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, group, dim)
    expected_by_dtype = {}
    for dtype in dtypes_for(device):
        q_d, k_d, v_d = q.to(dtype), k_pool.to(dtype), v_pool.to(dtype)
        meta = TritonMetadata.build(step, torch.device(device), q.shape[1] // k_pool.shape[1])
        got = triton_attention(q_d, k_d, v_d, meta, scale)
        assert got.dtype == dtype and got.shape == q.shape
        expected_by_dtype[dtype] = dense_attention(q_d, k_d, v_d, step, scale)
        err = max_rel_error(got, expected_by_dtype[dtype])
        assert err < TOLERANCE[dtype], f"{dtype}: max relative error {err:.2e}"


def persistent(step: AttentionStep, rng: random.Random) -> AttentionStep:
    """``step`` laid out as the model runner keeps it: each sequence's own blocks in a random
    row of a wider block table among rows of other sequences (random blocks), each level's in a
    random row of the prefix tables, every row written at version 1."""
    width = step.tables.shape[1] + 3
    rows = rng.sample(range(2 * step.num_seqs + 3), step.num_seqs)
    tables = np.asarray(
        [[rng.randrange(400) for _ in range(width)] for _ in range(2 * step.num_seqs + 3)],
        dtype=np.int32,
    )
    tables[rows] = 0
    tables[rows, : step.tables.shape[1]] = step.tables[step.table_rows]
    level_rows = rng.sample(range(2 * len(step.levels) + 2), len(step.levels))
    prefix = np.asarray(
        [[rng.randrange(400) for _ in range(5)] for _ in range(2 * len(step.levels) + 2)],
        dtype=np.int32,
    )
    for lvl, row in zip(step.levels, level_rows):
        prefix[row] = 0
        prefix[row, : len(lvl.block_ids)] = lvl.block_ids
    ones = np.ones(len(tables), dtype=np.int64), np.ones(len(prefix), dtype=np.int64)
    return replace(
        step,
        tables=tables,
        table_rows=np.asarray(rows),
        levels=tuple(replace(lvl, table_row=r) for lvl, r in zip(step.levels, level_rows)),
        prefix_tables=prefix,
        versions=TableVersions(*ones, 1),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_kernels_read_resident_tables_by_row(seed: int, device: str) -> None:
    """The runner's persistent tables, kept on the device by row diffs and read in place: each
    sequence's and level's blocks in a row of its own among other rows, the same attention as
    the reference (which reads the step's own rows and the levels' block ids); a later step
    uploads only the rows written since."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    step = persistent(random_step(rng, 16), rng)
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, 2, 32)
    dev = torch.device(device)
    resident = (ResidentTable(dev, mirror=True), ResidentTable(dev, mirror=True))
    staged = TritonMetadata.stage(step, 2, resident=resident)
    assert len(staged.arrays["own.rows"]) == len(step.tables)  # the first upload: every row
    meta = staged.build(upload(staged.arrays, dev))
    assert meta.block_table.shape == step.tables.shape  # the whole table, not gathered rows
    got = triton_attention(q, k_pool, v_pool, meta, scale)
    err = max_rel_error(got, dense_attention(q, k_pool, v_pool, step, scale))
    assert err < TOLERANCE[torch.float32], f"max relative error {err:.2e}"
    # Version 2 rewrites one sequence's row (a grown table): only that row travels.
    tables, row = step.tables.copy(), int(step.table_rows[0])
    written = step.versions.tables.copy()
    tables[row, -1], written[row] = 7, 2
    later = replace(step, tables=tables, versions=replace(step.versions, tables=written, version=2))
    staged = TritonMetadata.stage(later, 2, resident=resident)
    assert staged.arrays["own.rows"].tolist() == [row]
    assert len(staged.arrays["levels.rows"]) == 0
    meta = staged.build(upload(staged.arrays, dev))
    assert torch.equal(meta.block_table.cpu(), torch.from_numpy(tables))


@pytest.mark.parametrize("device", DEVICES)
def test_compressed_latent_cache_matches_reference(device: str) -> None:
    """Multi-head latent attention's cache (one KV head whose value is its key's first lanes,
    stored once) through the backend, every dtype the device computes: on CUDA at
    DeepSeek-V3's sizes (a key of 512 + 64 lanes, 128 query heads: 8 head programs per tile),
    under the interpreter at 32 + 16 lanes and 48 heads (3 programs)."""
    rng = random.Random(21)
    torch.manual_seed(21)
    step = random_step(rng, 16, max_depth=2)
    rank, rope, heads = (512, 64, 128) if device == "cuda" else (32, 16, 48)
    scale = (128 + 64) ** -0.5
    for dtype in dtypes_for(device):
        cache = KVCache(1, 400, 16, 1, rank + rope, dtype, device, rank, value_in_key=True)
        cache.k.normal_()
        backend = TritonBackend(cache, heads, scale)
        q = torch.randn(step.num_rows, heads, rank + rope, device=device, dtype=dtype)
        k = torch.randn(step.num_rows, 1, rank + rope, device=device, dtype=dtype)
        got = backend.forward(0, q, k, k[..., :rank], backend.prepare(step))
        assert got.shape == (step.num_rows, heads, rank) and got.dtype == dtype
        expected = dense_attention(q, cache.k[0], cache.v[0], step, scale)
        err = max_rel_error(got, expected)
        assert err < TOLERANCE[dtype], f"{dtype}: max relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_prefix_partials_are_each_levels_attention(seed: int, device: str) -> None:
    """The prefix-level kernel alone: each level's rows against its own blocks, output and
    log-sum-exp, at the level's place in the partial buffer; split into 1, 3 or 4 parts of the
    level's KV, the parts merge (by log-sum-exp) into the same."""
    rng = random.Random(100 + seed)
    step = random_step(rng, (16, 32)[seed % 2])
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, (4, 8, 3)[seed], 32 << seed)
    meta = TritonMetadata.build(step, torch.device(device), q.shape[1] // k_pool.shape[1])
    splits = (1, 3, 4)[seed]
    parts, part_lse = prefix_partials(q, k_pool, v_pool, meta, scale, splits)
    rows = sum(lvl.row_end - lvl.row_start for lvl in step.levels)
    assert parts.shape == (splits, rows, *q.shape[1:])
    assert part_lse.shape == (splits, rows, q.shape[1])
    lse = part_lse.logsumexp(0)
    o = (parts * (part_lse - lse).exp()[..., None]).sum(0)
    at = 0
    for lvl in step.levels:
        pos = torch.arange(lvl.end - lvl.start)
        slots = torch.tensor(lvl.block_ids)[pos // step.block_size] * step.block_size
        slots = (slots + pos % step.block_size).to(device)
        level_rows = q[lvl.row_start : lvl.row_end]
        o_ref, lse_ref = attend_lse(level_rows, k_pool[slots], v_pool[slots], None, scale)
        n = lvl.row_end - lvl.row_start
        torch.testing.assert_close(o[at : at + n], o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[at : at + n], lse_ref, rtol=1e-5, atol=1e-5)
        at += n


# Gemma-like layers: windows shorter than most levels (1-3 blocks each, up to 3 deep), about
# one level long, longer than any context; soft-capped scores with and without a window.
LAYERS = {
    "window-5": LayerAttention(window=5),
    "window-16": LayerAttention(window=16),
    "window-37-softcap": LayerAttention(window=37, softcap=4.0),
    "window-4096": LayerAttention(window=4096),
    "softcap": LayerAttention(softcap=1.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", LAYERS)
def test_windows_and_softcaps_match_reference(layer: str, device: str) -> None:
    """Random mixed steps under nested levels with a layer's sliding window and soft-cap, whole
    and with the KV split (parts that start inside and before a window)."""
    seed = list(LAYERS).index(layer) % 2
    rng = random.Random(200 + seed)
    torch.manual_seed(seed)
    step = random_step(rng, (16, 32)[seed])
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, (4, 1)[seed], 32)
    meta = TritonMetadata.build(step, torch.device(device), q.shape[1] // k_pool.shape[1])
    attn = LAYERS[layer]
    expected = dense_attention(q, k_pool, v_pool, step, scale, attn)
    for splits in (KVSplits(), KVSplits(3, 2)):
        got = triton_attention(q, k_pool, v_pool, meta, scale, splits, attn)
        err = max_rel_error(got, expected)
        assert err < 1e-5, f"{splits}: max relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_a_level_before_every_window_adds_an_empty_partial(device: str) -> None:
    """A decode row 40 positions past a 2-block level with a window of 20: the level's partial
    for that row has no key (lse -1e30, weighing nothing); a row inside the window reads it."""
    rng = random.Random(5)
    maker = StepMaker(rng, 16, 64)
    level = maker.blocks(2)
    maker.seq(level, own_before=40, q_len=1)  # at position 72: sees 53..72
    maker.seq(level, own_before=0, q_len=1)  # at position 32: sees 13..32
    maker.levels = [PrefixLevel(0, 32, tuple(level), 0, 2, 0, 2, 0)]
    step = maker.step()
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, 2, 32)
    meta = TritonMetadata.build(step, torch.device(device), 2)
    attn = LayerAttention(window=20)
    _, lse = prefix_partials(q, k_pool, v_pool, meta, scale, 1, attn)
    assert (lse[0, 0] == -1e30).all() and (lse[0, 1] > -1e29).all()
    err = max_rel_error(
        triton_attention(q, k_pool, v_pool, meta, scale, attn=attn),
        dense_attention(q, k_pool, v_pool, step, scale, attn),
    )
    assert err < 1e-5, f"max relative error {err:.2e}"


def long_decode_step(rng: random.Random, bs: int) -> AttentionStep:
    """What split-KV is for: decode rows below a 2-deep chain of long levels (6 and 3 blocks)
    and rows read whole, with long own KV (up to 200 positions), plus one prefill chunk."""
    maker = StepMaker(rng, bs, 400)
    top, mid = maker.blocks(6), maker.blocks(3)
    for prefix in [top + mid] * 3 + [top] * 2:
        maker.seq(prefix, own_before=rng.randrange(0, 90), q_len=1)
    below_mid, below_top = maker.seqs[2].q_start + 1, maker.rows
    for _ in range(3):
        maker.seq([], own_before=rng.randrange(100, 200), q_len=1)
    maker.seq([], own_before=40, q_len=20)
    maker.levels = [
        PrefixLevel(0, 6 * bs, tuple(top), 0, 5, 0, below_top, 0),
        PrefixLevel(6 * bs, 9 * bs, tuple(mid), 0, 3, 0, below_mid, 1),
    ]
    return maker.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "prefix,own", [(1, 1), (4, 1), (1, 3), (4, 2), (16, 4)], ids=lambda n: f"{n}"
)
def test_split_kv_matches_reference(prefix: int, own: int, device: str) -> None:
    """Each level's KV and each row's own KV split into parts (some empty: a level of 96
    positions in 16 parts of 32), merged by log-sum-exp, in every dtype the device computes."""
    rng = random.Random(prefix * 10 + own)
    step = long_decode_step(rng, 16)
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, 4, 32)
    meta = TritonMetadata.build(step, torch.device(device), 4)
    for dtype in dtypes_for(device):
        q_d, k_d, v_d = q.to(dtype), k_pool.to(dtype), v_pool.to(dtype)
        got = triton_attention(q_d, k_d, v_d, meta, scale, KVSplits(prefix, own))
        err = max_rel_error(got, dense_attention(q_d, k_d, v_d, step, scale))
        assert got.dtype == dtype and err < TOLERANCE[dtype], f"{dtype}: {err:.2e}"


def test_split_counts() -> None:
    """Splits are powers of two up to 16 that bring a grid to the target, none for a full
    grid, no work, or no target (the CPU). Padded metadata (a CUDA-graph bucket) counts the
    tiles its rows can fill, not its padding."""
    assert [splits_for(p, 264) for p in (64, 66, 132, 200, 264, 1000, 0)] == [
        8, 4, 2, 2, 1, 1, 1,
    ]  # fmt: skip
    assert splits_for(1, 264) == 16 and splits_for(64, 0) == 1
    # 8 levels x 16 rows, 16 rows per prefix tile, 8 KV heads: 64 programs -> 8 parts; 128
    # own tiles x 8 heads fill the device.
    assert choose_splits(8, 128, 8, 264) == KVSplits(8, 1)
    assert choose_splits(0, 4, 8, 264) == KVSplits(1, 16)  # 4 rows, no levels
    assert choose_splits(8, 128, 8, 0) == KVSplits(1, 1)
    # The step padded to its bucket: 576 prefix tiles, 128 own tiles, the same busy ones.
    assert busy_tiles(576, 128, 16, padded=True) == 8 and busy_tiles(8, 128, 16, False) == 8
    assert busy_tiles(128, 128, 1, padded=True) == 128
    assert busy_tiles(384, 128, 16, padded=False) == 384  # unpadded: every tile is work


@pytest.mark.parametrize("device", DEVICES)
def test_padded_prefix_tiles_beyond_the_programs(device: str) -> None:
    """Padded metadata whose real prefix tiles outnumber the programs launched for it (nested
    levels: 1 program for 4 rows, 3 levels): each program takes tiles until the padding."""
    rng = random.Random(9)
    maker = StepMaker(rng, 16, 64)
    chain = [maker.blocks(1) for _ in range(3)]
    for _ in range(4):
        maker.seq([b for blocks in chain for b in blocks], own_before=3, q_len=1)
    maker.levels = [
        PrefixLevel(16 * d, 16 * d + 16, tuple(chain[d]), 0, 4, 0, 4, d) for d in range(3)
    ]
    step = maker.step()
    shape = MetadataShape(
        rows=4, seqs=4, max_blocks=8, levels=12, max_level_blocks=1, max_depth=3,
        own_tiles=4, prefix_tiles=14, partials=12,
    )  # fmt: skip
    meta = TritonMetadata.build(step, torch.device(device), 4, shape)
    assert meta.padded and busy_tiles(14, 4, meta.prefix_rows, True) == 1
    q, k_pool, v_pool, scale = random_inputs(rng, step, device, 4, 32)
    got = triton_attention(q, k_pool, v_pool, meta, scale, KVSplits(2, 1))
    err = max_rel_error(got, dense_attention(q, k_pool, v_pool, step, scale))
    assert err < 1e-5, f"max relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_edge_shapes(device: str) -> None:
    """GQA 8 over one KV head, block size 32: a level of exactly one block over a sequence with
    no own KV before its new tokens, a 3-deep chain, a prefill chunk crossing two block
    boundaries, and a plain sequence of one token."""
    rng = random.Random(7)
    bs = 32
    maker = StepMaker(rng, bs, 64)
    one = maker.blocks(1)
    maker.seq(one, own_before=0)  # context = one block of prefix + its new tokens
    mid = maker.blocks(2)
    maker.seq(one + mid, own_before=0)
    deep = maker.blocks(1)
    maker.seq(one + mid + deep, own_before=5)
    maker.levels = [
        PrefixLevel(0, bs, tuple(one), 0, 3, 0, maker.rows, 0),
        PrefixLevel(bs, 3 * bs, tuple(mid), 1, 2, maker.seqs[1].q_start, maker.rows, 1),
        PrefixLevel(3 * bs, 4 * bs, tuple(deep), 2, 1, maker.seqs[2].q_start, maker.rows, 2),
    ]
    table = tuple(maker.blocks(3))
    maker.seqs.append(SeqStep(maker.rows, 70, 90, table))  # positions 20-89: crosses 32 and 64
    maker.rows += 70
    maker.seqs.append(SeqStep(maker.rows, 1, 1, tuple(maker.blocks(1))))
    maker.rows += 1
    step = maker.step()
    q = torch.randn(step.num_rows, 8, 64, device=device)
    k_pool = torch.randn(64 * bs, 1, 64, device=device)
    v_pool = torch.randn_like(k_pool)
    meta = TritonMetadata.build(step, torch.device(device), 8)
    got = triton_attention(q, k_pool, v_pool, meta, 0.125)
    err = max_rel_error(got, dense_attention(q, k_pool, v_pool, step, 0.125))
    assert err < 1e-5, f"max relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_backend_writes_kv_then_attends(device: str) -> None:
    """TritonBackend.forward stores the step's K/V at the new tokens' slots (and nowhere else),
    then matches the reference over the updated pool."""
    dev = torch.device(device)
    assert triton_available(dev)
    rng = random.Random(3)
    step = random_step(rng, 16, max_depth=2)
    cache = KVCache(2, 400, 16, 2, 32, torch.float32, dev)
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    backend = TritonBackend(cache, num_heads=4, scale=32**-0.5)
    meta = backend.prepare(step)
    q = torch.randn(step.num_rows, 4, 32, device=dev)
    k = torch.randn(step.num_rows, 2, 32, device=dev)
    v = torch.randn(step.num_rows, 2, 32, device=dev)
    got = backend.forward(1, q, k, v, meta)
    slots = meta.slot_mapping.long()
    assert torch.equal(cache.k[1, slots], k) and torch.equal(cache.v[1, slots], v)
    before_k[1, slots], before_v[1, slots] = k, v
    assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)
    err = max_rel_error(got, dense_attention(q, cache.k[1], cache.v[1], step, backend.scale))
    assert err < 1e-5, f"max relative error {err:.2e}"


def test_metadata_layout() -> None:
    """Tiles, partial offsets and slots of a small hand-made step (two sequences under one
    level, GQA 4 -> 8 rows per own tile, 16 per prefix tile)."""
    table = (5, 9, 2)
    step = AttentionStep.of(
        seqs=(
            SeqStep(0, 20, 40, table, shared_len=16),
            SeqStep(20, 1, 17, (5, 7), shared_len=16),
        ),
        levels=(PrefixLevel(0, 16, (5,), 0, 2, 0, 21, 0),),
        num_rows=21,
        block_size=16,
    )
    meta = TritonMetadata.build(step, torch.device("cpu"), group_size=4)
    assert meta.own_tile_seq.tolist() == [0, 0, 0, 1]
    assert meta.own_tile_q0.tolist() == [0, 8, 16, 0]
    assert meta.prefix_tile_level.tolist() == [0, 0]
    assert meta.prefix_tile_row0.tolist() == [0, 16]
    assert meta.num_partials == 21 and meta.level_out.tolist() == [0]
    assert meta.seq_levels.tolist() == [[0], [0]] and meta.num_levels.tolist() == [1, 1]
    # Positions 20..39 of sequence 0, then position 16 of sequence 1.
    expected = [9 * 16 + p - 16 for p in range(20, 32)] + [2 * 16 + p - 32 for p in range(32, 40)]
    assert meta.slot_mapping.tolist() == expected + [7 * 16]
    assert meta.block_table.tolist() == [[9, 2], [7, 0]]  # own blocks, after the shared one


def test_metadata_rejects_inconsistent_steps() -> None:
    seq = SeqStep(0, 4, 36, (1, 2, 3), shared_len=16)
    level = PrefixLevel(0, 16, (1,), 0, 1, 0, 4, 0)
    good = AttentionStep.of((seq,), (level,), 4, 16)
    TritonMetadata.build(good, torch.device("cpu"))
    bad = [
        replace(good, levels=()),  # shared positions no level covers
        replace(good, levels=(replace(level, depth=1),)),  # depth 1 without depth 0
        replace(good, levels=(replace(level, row_end=3),)),  # rows disagree with the sequence
        AttentionStep.of((replace(seq, block_table=(1, 2)),), (level,), 4, 16),  # short table
        replace(good, num_rows=5),
    ]
    for step in bad:
        with pytest.raises(ValueError):
            TritonMetadata.build(step, torch.device("cpu"))


# Compiles the kernels for an H100/H200 (sm_90) with bf16 inputs, without a GPU: the interpreter
# accepts code the compiler rejects (non-constexpr globals, dot shapes), and bf16 cannot be run on
# the CPU. Run in a subprocess because TRITON_INTERPRET is read when a kernel is decorated.
COMPILE_SM90 = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prefixbatch.execution.attention import triton_kernels as tk

def signature(fn, constexprs):
    data = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "k_pool_ptr", "v_pool_ptr")
    return {
        a: "constexpr" if a in constexprs
        else "*bf16" if a in data
        else "*fp32" if a in ("po_ptr", "plse_ptr", "so_ptr", "slse_ptr")
        else "*i32" if a.endswith("_ptr")
        else "fp32" if a in ("qk_scale", "cap_scale")
        else "i32"
        for a in fn.arg_names
    }

tiles = dict(BLOCK_N=tk.BLOCK_N, HEAD_DIM=128, BLOCK_SIZE=16, PRECISION="tf32")
plain = dict(SOFTCAP=False, SLIDING=False, TAIL=0, HEAD_SPLITS=1)
gemma = dict(SOFTCAP=True, SLIDING=True, TAIL=0, HEAD_SPLITS=1)
# DeepSeek-V3's MLA: a value of 512 lanes inside a key of 576, 128 query heads in 8 programs
mla = dict(**{**tiles, "HEAD_DIM": 512}, SOFTCAP=False, SLIDING=False, TAIL=64, HEAD_SPLITS=8)
for fn, constexprs in (
    (tk.prefix_level_kernel, dict(G=4, ROWS=16, BLOCK_M=64, **tiles, **plain)),
    (tk.prefix_level_kernel, dict(G=4, ROWS=16, BLOCK_M=64, **tiles, **gemma)),
    (tk.prefix_level_kernel, dict(G=16, ROWS=4, BLOCK_M=64, **mla)),
    (tk.own_kv_kernel, dict(G=4, ROWS=8, BLOCK_M=32, SPLIT=False, **tiles, **plain)),
    (tk.own_kv_kernel, dict(G=4, ROWS=8, BLOCK_M=32, SPLIT=True, **tiles, **plain)),
    (tk.own_kv_kernel, dict(G=4, ROWS=8, BLOCK_M=32, SPLIT=True, **tiles, **gemma)),
    (tk.own_kv_kernel, dict(G=16, ROWS=2, BLOCK_M=32, SPLIT=True, **mla)),
    (tk.merge_splits_kernel, dict(G=4, BLOCK_G=4, HEAD_DIM=128)),
    (tk.merge_splits_kernel, dict(G=16, BLOCK_G=16, HEAD_DIM=512)),
    (tk.store_kv_kernel, dict(ROW=1024, BLOCK=1024, STORE_V=True)),
    (tk.store_kv_kernel, dict(ROW=576, BLOCK=1024, STORE_V=False)),
):
    source = ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90_in_bf16() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["whole-kv", "split-kv"])
def test_padded_metadata_for_cuda_graphs(device: str, split: bool) -> None:
    """Metadata padded to a fixed shape (a CUDA-graph bucket) gives the unpadded result on the
    real rows and writes no KV for padding rows; refreshed in place from another step's
    metadata (what a graph replay reads), it computes that step. With split-KV (the backend
    told to fill a large device), the bucket's splits come from its fixed sizes alone."""
    dev = torch.device(device)
    shape = MetadataShape(
        rows=112, seqs=11, max_blocks=10, levels=6, max_level_blocks=4, max_depth=2,
        own_tiles=16, prefix_tiles=9, partials=128,
    )  # fmt: skip
    cache = KVCache(1, 400, 16, 2, 32, torch.float32, dev)
    cache.k.normal_()
    cache.v.normal_()
    backend = TritonBackend(cache, num_heads=4, scale=32**-0.5)
    if split:
        backend.target_programs = 64
    steps = [random_step(random.Random(seed), 16, max_depth=2) for seed in (11, 12)]
    static = backend.prepare(steps[0], shape)
    for i, step in enumerate(steps):
        if i:
            static.update_from(backend.prepare(step, shape))
        assert static.own_tile_seq.numel() == 16 and static.num_partials == 128
        assert backend.splits(static) == (KVSplits(8, 2) if split else KVSplits())
        t = step.num_rows
        q, k, v = (torch.randn(shape.rows, h, 32, device=dev) for h in (4, 2, 2))
        before_k = cache.k.clone()
        got = backend.forward(0, q, k, v, static)[:t]
        before_k[0, static.slot_mapping[:t].long()] = k[:t]
        assert torch.equal(cache.k, before_k)  # padding rows (slot -1) wrote nothing
        unpadded = backend.prepare(step)
        expected = triton_attention(q[:t], cache.k[0], cache.v[0], unpadded, backend.scale)
        if split:  # the same sums in another order
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, expected)
    with pytest.raises(ValueError):
        TritonMetadata.build(steps[0], dev, 2, replace(shape, seqs=2))
    with pytest.raises(ValueError):
        static.update_from(TritonMetadata.build(steps[0], dev, 2))


@pytest.mark.parametrize(
    "graphs,split,mirror", [(False, False, False), (False, False, True), (True, False, False),
                            (True, True, False)],
    ids=["eager", "eager-diffs", "graph-buffers", "split-kv"],
)  # fmt: skip
def test_engine_with_the_triton_backend_matches_transformers(tiny_models, graphs, split, mirror):  # type: ignore[no-untyped-def]
    """The whole engine through the Triton kernels (interpreter on the CPU, fp32): nested prefix
    levels read as levels (cascade on every group), prefill chunks and decode rows in one step.
    With graphs, decode steps go through the CUDA-graph runner's padded static buffers (run
    eagerly here: the same hooks and padding a capture replays); with split-KV, the backend
    aims at a device it fills only by splitting the KV of small steps; with diffs, the block
    tables the kernels read are device copies kept by row diffs, as on CUDA (on the CPU the
    kernels otherwise read the host arrays in place)."""
    from conftest import hf_greedy, nested_prompts
    from prefixbatch import LLM, SamplingParams
    from prefixbatch.execution.attention.triton_backend import TritonBackend

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    rng = random.Random(3)
    prompts = nested_prompts(rng, system=16, doc=16, docs=2, per_doc=2, vocab=(3, 500))
    prompts += [[rng.randrange(3, 500) for _ in range(11)]]  # shares nothing
    llm = LLM(
        str(tiny_models["llama"]),
        device="cpu",
        block_size=8,
        kv_cache_memory=4 * 2**20,
        attention_backend="triton",
        cascade_min_prefix=0,
        max_num_batched_tokens=24,  # prefill chunks cross block edges and mix with decodes
        cuda_graphs=graphs,
        max_cuda_graph_batch=4,  # decode steps of 5+ rows run eagerly
    )
    backend = llm.engine.backend
    assert isinstance(backend, TritonBackend)
    assert (llm.engine.worker.graphs is not None) == graphs
    shipped = []  # (rows sent, rows in the table) of each block-table update
    if mirror:
        cpu = torch.device("cpu")
        own = ResidentTable(cpu, mirror=True)
        backend.resident = (own, ResidentTable(cpu, mirror=True))
        stage = own.stage

        def counted(host, written, version, key):  # type: ignore[no-untyped-def]
            arrays, apply = stage(host, written, version, key)
            shipped.append((len(arrays[f"{key}.rows"]), len(host)))
            return arrays, apply

        own.stage = counted  # type: ignore[method-assign]
    chosen = []
    if split:
        backend.target_programs = 8
        choose = backend.splits
        backend.splits = lambda meta: chosen.append(choose(meta)) or chosen[-1]  # type: ignore[method-assign]
    replays = []
    if graphs:
        runner = llm.engine.worker.graphs
        run = runner.run
        runner.run = lambda *a: replays.append(a[0].shape[0]) or run(*a)  # type: ignore[method-assign]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert bool(replays) == graphs  # decode steps of up to 4 rows went through the buffers
    assert any(c.prefix > 1 and c.own > 1 for c in chosen) == split
    assert llm.engine.stats.groups >= 3  # the system prompt and two documents were levels
    if mirror:  # after the first step, only the rows written since travelled
        assert shipped and all(sent < rows for sent, rows in shipped[1:])
    assert [o.output_token_ids for o in outs] == hf_greedy(
        tiny_models["llama"], prompts, [3] * len(prompts)
    )


def test_auto_never_picks_the_interpreter():  # type: ignore[no-untyped-def]
    from prefixbatch.execution.attention.registry import select_backend
    from prefixbatch.execution.attention.triton_backend import TritonBackend
    from prefixbatch.execution.kv_cache import KVCache

    cache = KVCache(1, 4, 16, 2, 16, torch.float16, torch.device("cpu"))
    assert not isinstance(select_backend("auto", cache, 4, 0.25), TritonBackend)
    if triton_available(torch.device("cpu")):
        assert isinstance(select_backend("triton", cache, 4, 0.25), TritonBackend)
