"""The fast attention paths (PyTorch shared-prefix cascade; the compiled CPU kernels: paged
decode, prefix levels, prefill chunks, K/V write) against the plain reference path, on random
shapes; and the fallback when the kernels cannot be built."""

from __future__ import annotations

import itertools
import platform
import random
from pathlib import Path

import pytest
import torch

from conftest import dense_attention, hf_greedy, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution import native_build
from prefixbatch.execution.attention.backend import (
    FULL_ATTENTION,
    DecodeBatch,
    LayerAttention,
    PrefillSlice,
)
from prefixbatch.execution.attention.native import (
    SOURCES,
    CpuBackend,
    DecodeKernels,
    decode_kernels,
    kernel_options,
)
from prefixbatch.execution.attention.reference import (
    ReferenceBackend,
    attend_decode,
    attend_slice,
    soft_cap,
)
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.kv_cache import KVCache
from prefixbatch.execution.model_runner import ModelRunner
from prefixbatch.scheduling.scheduler import ScheduledStep
from prefixbatch.scheduling.sequence import PrefixGroup, Sequence

BS = 16
# The compiled kernel is built with -ffast-math (vectorised exp, reassociated sums): over
# contexts of thousands of fp32 terms its error reaches about 1e-5 of the largest output.
KERNEL_RTOL = 3e-5
# Two PyTorch paths in fp32 (cascade + log-sum-exp merge against one SDPA call): their
# summation orders, which also depend on how many threads split a product, differ by up to
# about 1.2e-5 of the largest output.
TORCH_RTOL = 2e-5


def random_step(rng: random.Random, num_blocks: int):  # type: ignore[no-untyped-def]
    """Sequences under up to two nested prefix levels, plus some plain ones, each with a decode
    token or a prefill chunk, over randomly placed blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    levels = [rng.choice([0, 1, 3, 20, 130]), rng.choice([0, 1, 4])]
    group = None
    for extra in levels:
        if extra == 0:
            continue
        start = len(group.tokens) if group else 0
        tokens = [0] * (start + extra * BS)
        blocks = (group.blocks if group else []) + [free.pop() for _ in range(extra)]
        group = PrefixGroup(0, tokens, remaining=1, parent=group, blocks=blocks, ready=True)
    step = ScheduledStep()
    members = rng.choice([1, 2, 7, 64])
    for i in range(members + rng.randrange(0, 4)):
        g = group if i < members else None
        shared = len(g.tokens) if g else 0
        own = rng.randrange(1, 70)
        n = 1 if rng.random() < 0.6 else rng.randrange(1, own + 1)
        table = (list(g.blocks) if g else []) + [free.pop() for _ in range(-(-own // BS))]
        seq = Sequence(
            i,
            [0] * (shared + own),
            shared + own,
            SamplingParams(),
            group=g,
            block_table=table,
            batch_index=i,
        )
        seq.computed = shared + own - n
        step.add(seq, n)
        step.admitted.append(seq)
    return step


def _rows(last_row: list[int], num_tokens: list[int]) -> torch.Tensor:
    """Rows of every scheduled token, in scheduled order."""
    return torch.cat([torch.arange(r - n + 1, r + 1) for r, n in zip(last_row, num_tokens)])


def kernels() -> DecodeKernels:
    """The compiled kernels; CI has a compiler, so a failed build fails the test."""
    k = decode_kernels()
    assert k is not None, "the CPU decode-attention kernels did not build"
    return k


# Gemma-like layers: windows shorter than most prefix levels (1-130 blocks of 16), as long as
# some, longer than all; scores soft-capped with and without a window.
LAYERS = {
    "global": FULL_ATTENTION,
    "window-9": LayerAttention(window=9),
    "window-48": LayerAttention(window=48),
    "window-5000": LayerAttention(window=5000),
    "softcap": LayerAttention(softcap=2.0),
    "window-20-softcap": LayerAttention(window=20, softcap=5.0),
}


STEPS = [(seed, "global") for seed in range(16)]
STEPS += [(seed, layer) for layer in LAYERS if layer != "global" for seed in range(4)]


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize(("seed", "layer"), STEPS)
def test_shared_prefix_matches_reference(seed, layer, native):  # type: ignore[no-untyped-def]
    """Random steps below nested prefix levels, each row's attention as the reference computes
    it over its whole context (sliding windows and soft-caps included)."""
    attn = LAYERS[layer]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3, 4, 8])
    dim = rng.choice([16, 32, 64])
    cache = KVCache(1, 2048, BS, kv_heads, dim, torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    step = random_step(rng, 2048)
    scale = dim**-0.5
    reference = ReferenceBackend(cache, heads, scale)
    fast = (
        CpuBackend(cache, heads, scale, kernels())
        if native
        else SharedPrefixBackend(cache, heads, scale)
    )
    cpu = torch.device("cpu")
    plain = ModelRunner(None, reference, BS, cpu)  # type: ignore[arg-type]
    shared = ModelRunner(None, fast, BS, cpu, True, min_shared=1)  # type: ignore[arg-type]
    # Every sequence samples its last row: logits_rows are the last rows in scheduled order.
    plain_in, shared_in = plain.inputs(step), shared.inputs(step)
    attn_plain, last_plain = plain_in.attn, plain_in.logits_rows.tolist()
    attn_shared, last_shared = shared_in.attn, shared_in.logits_rows.tolist()
    assert bool(attn_shared.levels) == (fast.shares_prefix and any(s.group for s in step.seqs))
    meta_plain, meta_shared = reference.prepare(attn_plain), fast.prepare(attn_shared)
    # Row r of the scheduled order sits at rows_plain[r] and rows_shared[r] (the shared runner
    # groups the sequences below each level together).
    rows_plain = _rows(last_plain, step.num_tokens)
    rows_shared = _rows(last_shared, step.num_tokens)
    t = attn_plain.num_rows
    q_s, k_s, v_s = (
        torch.randn(t, heads, dim),
        torch.randn(t, kv_heads, dim),
        torch.randn(t, kv_heads, dim),
    )
    q, k, v = (torch.empty_like(x) for x in (q_s, k_s, v_s))
    q[rows_plain], k[rows_plain], v[rows_plain] = q_s, k_s, v_s
    expected = reference.forward(0, q, k, v, meta_plain, attn)[rows_plain]
    q[rows_shared], k[rows_shared], v[rows_shared] = q_s, k_s, v_s
    got = fast.forward(0, q, k, v, meta_shared, attn)[rows_shared]
    assert torch.isfinite(got).all()
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < (KERNEL_RTOL if native else TORCH_RTOL), f"max relative error {rel:.2e}"


@pytest.mark.parametrize("layer", LAYERS)
def test_reference_backend_matches_the_dense_definition(layer: str) -> None:
    """The plain PyTorch path (SDPA, or the explicit softmax for soft-caps) on a random step
    against attention written out per sequence in float64."""
    rng = random.Random((3, 7, 9, 17, 29, 18)[list(LAYERS).index(layer)])  # steps of < 3.4k tokens
    torch.manual_seed(1)
    cache = KVCache(1, 2048, BS, 2, 32, torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    reference = ReferenceBackend(cache, 6, 32**-0.5)
    runner = ModelRunner(None, reference, BS, torch.device("cpu"))  # type: ignore[arg-type]
    step = runner.inputs(random_step(rng, 2048)).attn
    meta = reference.prepare(step)
    q = torch.randn(step.num_rows, 6, 32)
    k, v = cache.k[0][meta.slot_mapping], cache.v[0][meta.slot_mapping]  # rewrites what is there
    got = reference.forward(0, q, k, v, meta, LAYERS[layer])
    expected = dense_attention(q, cache.k[0], cache.v[0], step, reference.scale, LAYERS[layer])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def padded(tables: list[list[int]]) -> torch.Tensor:
    """(rows, longest) block ids, each row padded with its own first block (as the engine's
    decode batches are: padding reads written K/V)."""
    widest = max(map(len, tables))
    return torch.tensor([t + [t[0]] * (widest - len(t)) for t in tables])


def random_pools(
    rng: random.Random, num_blocks: int, block_size: int, kv_heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random K and V pools (slots, KVH, D) and their block ids in random order (take with
    ``pop``), so a sequence's blocks are scattered over the pool."""
    k_pool = torch.randn(num_blocks * block_size, kv_heads, dim)
    v_pool = torch.randn(num_blocks * block_size, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    return k_pool, v_pool, free


def scores_lse(
    q: torch.Tensor, keys: torch.Tensor, scale: float, attn: LayerAttention
) -> torch.Tensor:
    """The log-sum-exp of one decode row's scores, q (H, D) against its context's keys (n, H, D)
    (its query at the last position), computed directly: the window keeps the last keys."""
    scores = soft_cap(torch.einsum("hd,nhd->hn", q, keys) * scale, attn.softcap)
    return scores[:, -(attn.window or len(keys)) :].logsumexp(-1)


def check_kernel(
    k: DecodeKernels,
    rng: random.Random,
    kv_heads: int,
    group: int,
    dim: int,
    lengths: list[int],
    attn: LayerAttention = FULL_ATTENTION,
) -> None:
    """``k.paged_decode`` against the plain PyTorch path on rows with these lengths, over blocks
    scattered in the pool, the rows sharing their first blocks at random; the log-sum-exp too."""
    heads = kv_heads * group
    num_blocks = sum(-(-n // BS) for n in lengths) + 8
    k_pool, v_pool, free = random_pools(rng, num_blocks, BS, kv_heads, dim)
    prefix = rng.choice([0, 1, 40])
    shared = [free.pop() for _ in range(min([prefix] + [n // BS for n in lengths]))]
    tables = [shared + [free.pop() for _ in range(-(-n // BS) - len(shared))] for n in lengths]
    ids, lens = padded(tables), torch.tensor(lengths)
    mask = (torch.arange(ids.shape[1] * BS)[None, :] < lens[:, None])[:, None, None, :]
    batch = DecodeBatch(torch.arange(len(lengths)), ids, lens, mask)
    q = torch.randn(len(lengths), heads + 2, dim)[:, :heads]  # rows strided, as from qkv
    scale = dim**-0.5
    expected = attend_decode(q, k_pool, v_pool, batch, scale, BS, attn)
    out, lse = k.paged_decode(q, k_pool, v_pool, ids, lens, BS, scale, *kernel_options(attn))
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < KERNEL_RTOL, f"max relative error {rel:.2e}"
    for b, n in enumerate(lengths):  # lse of row b, head h: logsumexp of its scores
        keys = k_pool.view(-1, BS, kv_heads, dim)[ids[b]].reshape(-1, kv_heads, dim)[:n]
        keys = keys.repeat_interleave(group, dim=1)  # (n, H, D)
        torch.testing.assert_close(
            lse[b], scores_lse(q[b], keys, scale, attn), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("seed", range(12))
def test_native_decode_kernel_matches_plain_attention(seed: int) -> None:
    """Random GQA shapes (head dims on the vector path, with a remainder, and off it), lengths
    from 1 to over a thousand, some a multiple of the block size, some not."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lengths = [rng.choice([1, 5, 16, 17, 200, 1100]) for _ in range(rng.randrange(1, 20))]
    kv_heads, group = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 4, 8])
    check_kernel(kernels(), rng, kv_heads, group, rng.choice([8, 16, 24, 64, 80, 128]), lengths)


@pytest.mark.parametrize("layer", [n for n in LAYERS if n != "global"])
@pytest.mark.parametrize("seed", range(4))
def test_native_decode_kernel_with_windows_and_softcaps(seed: int, layer: str) -> None:
    """Rows shorter than the window, as long, and far longer (a window starting inside a block,
    on its edge, blocks skipped); with a single thread long rows are split into pieces, the
    first starting at the window."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    attn = LAYERS[layer]
    window = attn.window or 1
    lengths = [1, window, window + 1, window + 16, 17, 200, 1100, rng.choice([5, 3001])]
    before = torch.get_num_threads()
    torch.set_num_threads(rng.choice([1, before]))
    try:
        dim = rng.choice([24, 64, 128])
        check_kernel(kernels(), rng, rng.choice([1, 2]), rng.choice([1, 3, 8]), dim, lengths, attn)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_native_decode_kernel_splits_long_contexts(seed: int, threads: int) -> None:
    """Batches too small for the threads: long contexts are cut into pieces merged by their
    log-sum-exp, whatever the thread count; short rows next to them stay whole."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lengths = [rng.choice([1, 17, 300, 2000, 3001]) for _ in range(rng.randrange(1, 4))]
    lengths[0] = 3001  # at least one row split into several pieces
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dim = rng.choice([24, 64, 128])
        check_kernel(kernels(), rng, rng.choice([1, 3]), rng.choice([1, 3, 8]), dim, lengths)
    finally:
        torch.set_num_threads(before)


def check_levels(
    k: DecodeKernels,
    rng: random.Random,
    kv_heads: int,
    group: int,
    dim: int,
    block_size: int,
    attn: LayerAttention = FULL_ATTENTION,
) -> None:
    """``paged_decode`` over rows' own blocks, then ``attend_prefix_levels`` over the nested
    prefix levels above them, against the plain PyTorch path over their whole contexts; the
    log-sum-exp too. Levels hang from each other at random (some read by no row, some by one,
    some by dozens: several lane chunks), rows sit below any level or none."""
    heads = kv_heads * group
    k_pool, v_pool, free = random_pools(rng, 1200, block_size, kv_heads, dim)
    parents: list[int | None] = []
    blocks: list[list[int]] = []
    for _ in range(rng.randint(1, 6)):
        parents.append(rng.choice([None, *range(len(blocks))]))
        blocks.append([free.pop() for _ in range(rng.choice([1, 2, 5, 40]))])

    def chain(level: int | None) -> list[int]:  # the level and those above it, outermost first
        return [] if level is None else chain(parents[level]) + [level]

    own_tables, own_lengths, full_tables, full_lengths, below = [], [], [], [], []
    for _ in range(rng.choice([1, 3, 7, 30])):
        levels = chain(rng.choice([None, *range(len(blocks))]))
        own = rng.randint(1, 70)
        own_blocks = [free.pop() for _ in range(-(-own // block_size))]
        prefix = [b for lvl in levels for b in blocks[lvl]]
        own_tables.append(own_blocks)
        own_lengths.append(own)
        full_tables.append(prefix + own_blocks)
        full_lengths.append(len(prefix) * block_size + own)
        below.append(levels)

    q = torch.randn(len(own_lengths), heads + 2, dim)[:, :heads]  # rows strided
    scale = dim**-0.5
    ids, lens = padded(full_tables), torch.tensor(full_lengths)
    mask = (torch.arange(ids.shape[1] * block_size)[None, :] < lens[:, None])[:, None, None, :]
    batch = DecodeBatch(torch.arange(len(lens)), ids, lens, mask)
    expected = attend_decode(q, k_pool, v_pool, batch, scale, block_size, attn)
    options = kernel_options(attn)
    out, lse = k.paged_decode(
        q, k_pool, v_pool, padded(own_tables), torch.tensor(own_lengths), block_size, scale,
        *options,
    )  # fmt: skip
    rows = [[r for r, levels in enumerate(below) if lvl in levels] for lvl in range(len(blocks))]
    starts = [sum(len(blocks[a]) for a in chain(lvl)[:-1]) for lvl in range(len(blocks))]
    k.attend_prefix_levels(
        q, k_pool, v_pool, out, lse, padded(blocks),
        torch.tensor([len(b) * block_size for b in blocks]),
        torch.tensor([0, *itertools.accumulate(map(len, rows))]),
        torch.tensor([r for level_rows in rows for r in level_rows], dtype=torch.int64),
        block_size, scale, torch.tensor(starts) * block_size, lens - 1, *options,
    )  # fmt: skip
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < KERNEL_RTOL, f"max relative error {rel:.2e}"
    for b, n in enumerate(full_lengths):
        keys = k_pool.view(-1, block_size, kv_heads, dim)[ids[b]].reshape(-1, kv_heads, dim)[:n]
        expected_lse = scores_lse(q[b], keys.repeat_interleave(group, dim=1), scale, attn)
        torch.testing.assert_close(lse[b], expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_prefix_levels_kernel_matches_plain_attention(seed: int) -> None:
    """Head dims with a compiled specialisation (64, 128) and without; block sizes under, at
    and over the vector width."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads, group = rng.choice([1, 2, 3]), rng.choice([1, 3, 4, 8])
    dim, block_size = rng.choice([8, 24, 64, 80, 128]), rng.choice([8, 16, 32])
    check_levels(kernels(), rng, kv_heads, group, dim, block_size)


@pytest.mark.parametrize("layer", [n for n in LAYERS if n != "global"])
@pytest.mark.parametrize("seed", range(4))
def test_prefix_levels_kernel_with_windows_and_softcaps(seed: int, layer: str) -> None:
    """Levels wholly before a row's window (read by no lane: they add nothing), partly inside
    (masked lane by lane), wholly inside."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads, group = rng.choice([1, 2]), rng.choice([1, 3, 8])
    dim, block_size = rng.choice([24, 64, 128]), rng.choice([8, 16])
    check_levels(kernels(), rng, kv_heads, group, dim, block_size, LAYERS[layer])


def check_prefill(
    k: DecodeKernels,
    rng: random.Random,
    kv_heads: int,
    group: int,
    dim: int,
    block_size: int,
    attn: LayerAttention = FULL_ATTENTION,
) -> None:
    """``prefill_attention`` on several chunks at once (a first chunk, chunks after earlier
    context, one token past a long context) against SDPA per chunk over gathered K/V; q is a
    row-strided view, as the fused qkv output gives it, and rows outside chunks stay as they
    were."""
    heads = kv_heads * group
    k_pool, v_pool, free = random_pools(rng, 400, block_size, kv_heads, dim)
    chunks, row = [], 1  # row 0 belongs to no chunk
    for _ in range(rng.randint(1, 4)):
        context = rng.choice([2, 17, 100, 700])
        q_len = rng.choice([context, min(context, rng.choice([2, 5, 33, 130]))])
        table = [free.pop() for _ in range(-(-context // block_size))]
        chunks.append((row, q_len, context, table))
        row += q_len
    qkv = torch.randn(row, heads + 7, dim)  # q: the first `heads` of each row
    q = qkv[:, :heads]
    out = torch.full((row, heads, dim), 5.0)
    widest = max(len(c[3]) for c in chunks)
    k.prefill_attention(
        q, k_pool, v_pool, out,
        torch.tensor([c[3] + [0] * (widest - len(c[3])) for c in chunks]),
        torch.tensor([c[0] for c in chunks]),
        torch.tensor([c[1] for c in chunks]),
        torch.tensor([c[2] for c in chunks]),
        block_size, dim**-0.5, *kernel_options(attn), torch.empty(0),
    )  # fmt: skip
    assert (out[0] == 5.0).all()
    for start, q_len, context, table in chunks:
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(context)])  # fmt: skip
        expected = attend_slice(
            q[start : start + q_len], k_pool, v_pool,
            PrefillSlice(start, q_len, slots), dim**-0.5, attn,
        )  # fmt: skip
        got = out[start : start + q_len]
        rel = (got - expected).abs().max() / expected.abs().max()
        assert rel < KERNEL_RTOL, f"max relative error {rel:.2e} (q_len {q_len}, {context})"


@pytest.mark.parametrize("seed", range(12))
def test_prefill_kernel_matches_plain_attention(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads, group = rng.choice([1, 2, 3]), rng.choice([1, 3, 4, 8])
    dim, block_size = rng.choice([8, 24, 64, 80, 128]), rng.choice([8, 16, 32])
    check_prefill(kernels(), rng, kv_heads, group, dim, block_size)


@pytest.mark.parametrize("layer", [n for n in LAYERS if n != "global"])
@pytest.mark.parametrize("seed", range(4))
def test_prefill_kernel_with_windows_and_softcaps(seed: int, layer: str) -> None:
    """Chunks whose lanes' windows begin in different tiles (masked), before the chunk's first
    query (tiles skipped), or before position 0 (a window longer than the context)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads, group = rng.choice([1, 2]), rng.choice([1, 3, 8])
    dim, block_size = rng.choice([24, 64, 128]), rng.choice([8, 16])
    check_prefill(kernels(), rng, kv_heads, group, dim, block_size, LAYERS[layer])


@pytest.mark.parametrize("rows", [1, 7, 600])
def test_kv_write_kernel_matches_index_copy(rows: int) -> None:
    """k and v as the fused qkv output gives them (row-strided views), scattered slots, a
    step small enough for one thread and one large enough for several."""
    torch.manual_seed(rows)
    kv_heads, dim, slots_total = 3, 64, 4096
    qkv = torch.randn(rows, 9 + 2 * kv_heads, dim)
    k, v = qkv[:, 9 : 9 + kv_heads], qkv[:, 9 + kv_heads :]
    slots = torch.randperm(slots_total)[:rows]
    cache = KVCache(1, slots_total // BS, BS, kv_heads, dim, torch.float32, torch.device("cpu"))
    plain = ReferenceBackend(cache, 9, 0.125)
    plain.write_kv(0, k, v, slots)
    expected_k, expected_v = cache.k[0].clone(), cache.v[0].clone()
    cache.k.zero_()
    cache.v.zero_()
    CpuBackend(cache, 9, 0.125, kernels()).write_kv(0, k, v, slots)
    assert torch.equal(cache.k[0], expected_k) and torch.equal(cache.v[0], expected_v)


def test_native_decode_kernel_without_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built for an AVX2-only CPU (x86-64-v3), the portable paths give the same results. On a
    CPU without AVX-512 the machine's own build is that build already (no second compile)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    if "avx512f" in Path("/proc/cpuinfo").read_text().split():
        flags = [f for f in native_build.CFLAGS if not f.startswith("-march")]
        monkeypatch.setattr(native_build, "CFLAGS", [*flags, "-march=x86-64-v3"])
        native_build.build_extension.cache_clear()
    try:
        built = decode_kernels()
        assert built is not None
        rng = random.Random(0)
        torch.manual_seed(0)
        for dim, lengths in [(64, [1, 17, 330, 3001]), (80, [5, 16, 200]), (24, [1, 40])]:
            for attn in (FULL_ATTENTION, LAYERS["window-20-softcap"]):
                check_kernel(built, rng, 3, 3, dim, lengths, attn)
                check_levels(built, rng, 3, 3, dim, 16, attn)
                check_prefill(built, rng, 3, 3, dim, 16, attn)
    finally:
        native_build.build_extension.cache_clear()


@pytest.mark.usefixtures("kernels_cannot_build")
def test_engine_falls_back_to_pytorch_when_the_kernel_cannot_build(tiny_models):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(6, seed=3)
    with pytest.warns(UserWarning, match="could not be built"):
        llm = LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    assert not isinstance(llm.engine.backend, CpuBackend)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [o.output_token_ids for o in outs] == hf_greedy(tiny_models["llama"], prompts, [6] * 6)


def test_kernel_build_is_announced_and_a_damaged_library_is_rebuilt(monkeypatch, tmp_path, caplog):  # type: ignore[no-untyped-def]
    import logging
    import types

    import torch.utils.cpp_extension as ext

    def fake_load(name, sources, build_directory, **kwargs):  # type: ignore[no-untyped-def]
        (Path(build_directory) / f"{name}.so").write_text("")  # not a loadable library
        return types.SimpleNamespace()

    monkeypatch.setattr(native_build, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(ext, "load", fake_load)
    native_build.build_extension.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="prefixbatch"):
            assert decode_kernels() is not None
            assert any("compiling the CPU attention kernels" in r.message for r in caplog.records)
            caplog.clear()
            native_build.build_extension.cache_clear()
            assert decode_kernels() is not None  # the library there does not load: built again
            assert any("rebuilding" in r.message for r in caplog.records)
            assert any("compiling" in r.message for r in caplog.records)
    finally:
        native_build.build_extension.cache_clear()


def test_a_built_library_loads_without_the_builder(monkeypatch):  # type: ignore[no-untyped-def]
    """Built once (by the session's first kernel use), the library is imported directly: torch's
    builder, whose ninja file names the checkout that built it, is not called again."""
    import torch.utils.cpp_extension as ext

    assert decode_kernels() is not None  # built into the cache, if it was not already

    def no_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached library should load without building")

    monkeypatch.setattr(ext, "load", no_build)
    native_build.build_extension.cache_clear()
    try:
        module = native_build.build_extension(SOURCES, "the CPU attention kernels")
        assert module is not None and hasattr(module, "paged_decode")
    finally:
        native_build.build_extension.cache_clear()
