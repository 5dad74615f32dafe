"""The fast attention paths (PyTorch shared-prefix cascade, compiled CPU decode kernel) against
the plain reference path, on random shapes; and the fallback when the kernel cannot be built."""

from __future__ import annotations

import platform
import random
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution import native_build
from prefixbatch.execution.attention.backend import DecodeBatch
from prefixbatch.execution.attention.native import (
    NativeDecodeBackend,
    PagedDecode,
    paged_decode_kernel,
)
from prefixbatch.execution.attention.reference import ReferenceBackend, attend_decode
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
            computed=shared + own - n,
        )
        step.add(seq, n)
    return step


def _rows(last_row: list[int], num_tokens: list[int]) -> torch.Tensor:
    """Rows of every scheduled token, in scheduled order."""
    return torch.cat([torch.arange(r - n + 1, r + 1) for r, n in zip(last_row, num_tokens)])


def kernel():  # type: ignore[no-untyped-def]
    """The compiled kernel; CI has a compiler, so a failed build fails the test."""
    k = paged_decode_kernel()
    assert k is not None, "the CPU decode-attention kernel did not build"
    return k


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("seed", range(16))
def test_shared_prefix_matches_reference(seed, native):  # type: ignore[no-untyped-def]
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
        NativeDecodeBackend(cache, heads, scale, kernel())
        if native
        else SharedPrefixBackend(cache, heads, scale)
    )
    cpu = torch.device("cpu")
    plain = ModelRunner(None, reference, BS, cpu)  # type: ignore[arg-type]
    shared = ModelRunner(None, fast, BS, cpu, share_prefix_attention=True)  # type: ignore[arg-type]
    attn_plain, _, last_plain = plain.describe(step)
    attn_shared, _, last_shared = shared.describe(step)
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
    expected = reference.forward(0, q, k, v, meta_plain)[rows_plain]
    q[rows_shared], k[rows_shared], v[rows_shared] = q_s, k_s, v_s
    got = fast.forward(0, q, k, v, meta_shared)[rows_shared]
    assert torch.isfinite(got).all()
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < (KERNEL_RTOL if native else TORCH_RTOL), f"max relative error {rel:.2e}"


def check_kernel(
    fn: PagedDecode, rng: random.Random, kv_heads: int, group: int, dim: int, lengths: list[int]
) -> None:
    """The kernel ``fn`` against the plain PyTorch path on rows with these lengths, over blocks
    scattered in the pool, the rows sharing their first blocks at random; the log-sum-exp too."""
    heads = kv_heads * group
    num_blocks = sum(-(-n // BS) for n in lengths) + 8
    k_pool = torch.randn(num_blocks * BS, kv_heads, dim)
    v_pool = torch.randn(num_blocks * BS, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    prefix = rng.choice([0, 1, 40])
    shared = [free.pop() for _ in range(min([prefix] + [n // BS for n in lengths]))]
    tables = [shared + [free.pop() for _ in range(-(-n // BS) - len(shared))] for n in lengths]
    widest = max(map(len, tables))
    ids = torch.tensor([t + [t[0]] * (widest - len(t)) for t in tables])
    lens = torch.tensor(lengths)
    mask = (torch.arange(widest * BS)[None, :] < lens[:, None])[:, None, None, :]
    batch = DecodeBatch(torch.arange(len(lengths)), ids, lens, mask)
    q = torch.randn(len(lengths), heads, dim)
    scale = dim**-0.5
    expected = attend_decode(q, k_pool, v_pool, batch, scale, BS)
    out, lse = fn(q, k_pool, v_pool, ids, lens, BS, scale)
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < KERNEL_RTOL, f"max relative error {rel:.2e}"
    for b, n in enumerate(lengths):  # lse of row b, head h: logsumexp of its scores
        keys = k_pool.view(-1, BS, kv_heads, dim)[ids[b]].reshape(-1, kv_heads, dim)[:n]
        keys = keys.repeat_interleave(group, dim=1)  # (n, H, D)
        scores = torch.einsum("hd,nhd->hn", q[b], keys) * scale
        torch.testing.assert_close(lse[b], scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_native_decode_kernel_matches_plain_attention(seed: int) -> None:
    """Random GQA shapes (head dims on the vector path, with a remainder, and off it), lengths
    from 1 to over a thousand, some a multiple of the block size, some not."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lengths = [rng.choice([1, 5, 16, 17, 200, 1100]) for _ in range(rng.randrange(1, 20))]
    kv_heads, group = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 4, 8])
    check_kernel(kernel(), rng, kv_heads, group, rng.choice([8, 16, 24, 64, 80, 128]), lengths)


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
        check_kernel(kernel(), rng, rng.choice([1, 3]), rng.choice([1, 3, 8]), dim, lengths)
    finally:
        torch.set_num_threads(before)


def test_native_decode_kernel_without_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built for an AVX2-only CPU (x86-64-v3), the portable paths give the same results."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    flags = [f for f in native_build.CFLAGS if not f.startswith("-march")] + ["-march=x86-64-v3"]
    monkeypatch.setattr(native_build, "CFLAGS", flags)
    native_build.build_extension.cache_clear()
    try:
        fn = paged_decode_kernel()
        assert fn is not None
        rng = random.Random(0)
        torch.manual_seed(0)
        for dim, lengths in [(64, [1, 17, 330, 3001]), (80, [5, 16, 200]), (24, [1, 40])]:
            check_kernel(fn, rng, 3, 3, dim, lengths)
    finally:
        native_build.build_extension.cache_clear()


@pytest.mark.usefixtures("kernels_cannot_build")
def test_engine_falls_back_to_pytorch_when_the_kernel_cannot_build(tiny_models):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(6, seed=3)
    with pytest.warns(UserWarning, match="could not be built"):
        llm = LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    assert not isinstance(llm.engine.backend, NativeDecodeBackend)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [o.output_token_ids for o in outs] == hf_greedy(tiny_models["llama"], prompts, [6] * 6)


def test_kernel_build_is_announced_only_when_it_compiles(monkeypatch, tmp_path, caplog):  # type: ignore[no-untyped-def]
    import logging
    import types

    import torch.utils.cpp_extension as ext

    def fake_load(name, sources, build_directory, **kwargs):  # type: ignore[no-untyped-def]
        (Path(build_directory) / f"{name}.so").write_text("")  # what a real build leaves
        return types.SimpleNamespace(paged_decode=lambda *a: None)

    monkeypatch.setattr(native_build, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(ext, "load", fake_load)
    native_build.build_extension.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="prefixbatch"):
            assert paged_decode_kernel() is not None
            assert any("compiling the CPU attention kernel" in r.message for r in caplog.records)
            caplog.clear()
            native_build.build_extension.cache_clear()
            paged_decode_kernel()  # built already: a cached module loads silently
            assert not any("compiling" in r.message for r in caplog.records)
    finally:
        native_build.build_extension.cache_clear()
