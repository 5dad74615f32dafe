"""Shared-prefix (cascade) attention against the plain reference path, on random shapes."""

from __future__ import annotations

import random

import pytest
import torch

from prefixbatch.execution.attention.backend import KVCache
from prefixbatch.execution.attention.reference import ReferenceBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.model_runner import ModelRunner
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.scheduler import ScheduledStep
from prefixbatch.scheduling.sequence import PrefixGroup, Sequence

BS = 16


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


@pytest.mark.parametrize("seed", range(16))
def test_shared_prefix_matches_reference(seed):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3, 4, 8])
    dim = rng.choice([16, 32, 64])
    cache = KVCache(1, 2048, BS, kv_heads, dim, torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    step = random_step(rng, 2048)
    plain = ModelRunner(None, None, BS, torch.device("cpu"))  # type: ignore[arg-type]
    shared = ModelRunner(None, None, BS, torch.device("cpu"), share_prefix_attention=True)  # type: ignore[arg-type]
    _, _, meta_plain = plain.prepare(step)
    _, _, meta_shared = shared.prepare(step)
    assert meta_shared.segments or not any(s.group for s in step.seqs)
    t = len(meta_plain.slot_mapping)
    q = torch.randn(t, heads, dim)
    k = torch.randn(t, kv_heads, dim)
    v = torch.randn(t, kv_heads, dim)
    scale = dim**-0.5
    expected = ReferenceBackend(cache, heads, scale).forward(0, q, k, v, meta_plain)
    got = SharedPrefixBackend(cache, heads, scale).forward(0, q, k, v, meta_shared)
    assert torch.isfinite(got).all()
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, f"max relative error {rel:.2e}"
