"""Attention sinks (gpt-oss: one learned logit per query head in every softmax denominator) in
every attention backend, on random mixed steps below nested prefix levels, with and without a
sliding window: the plain PyTorch reference against the dense definition in float64, and the
shared-prefix cascade, the compiled CPU kernels and the Triton kernels (interpreter) against
it. Sinks are applied once per row, after the levels' partials are merged: a backend that
applied them per partial would be off by the partials' weights."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_attention import kernels
from test_triton_attention import random_step

from conftest import dense_attention
from prefixbatch.execution.attention.backend import (
    AttentionBackend,
    LayerAttention,
    slot_mapping,
    with_sinks,
)
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.reference import ReferenceBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.step import AttentionStep
from prefixbatch.execution.attention.triton_backend import triton_available
from prefixbatch.execution.kv_cache import KVCache

BS = 16
HEADS, KV_HEADS, DIM = 6, 2, 32


def backend(name: str, cache: KVCache) -> AttentionBackend:
    scale = DIM**-0.5
    if name == "reference":
        return ReferenceBackend(cache, HEADS, scale)
    if name == "shared_prefix":
        return SharedPrefixBackend(cache, HEADS, scale)
    if name == "native":
        return CpuBackend(cache, HEADS, scale, kernels())
    if not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    from prefixbatch.execution.attention.triton_backend import TritonBackend

    return TritonBackend(cache, HEADS, scale)


def test_with_sinks_is_one_more_logit_in_the_softmax() -> None:
    torch.manual_seed(0)
    scores, v, sinks = torch.randn(3, HEADS, 5), torch.randn(3, HEADS, 5, DIM), torch.randn(HEADS)
    out = torch.einsum("nhl,nhld->nhd", scores.softmax(-1), v)
    with_sink = torch.cat((scores, sinks[None, :, None].expand(3, -1, 1)), -1).softmax(-1)
    expected = torch.einsum("nhl,nhld->nhd", with_sink[..., :-1], v)
    got = with_sinks(out, scores.logsumexp(-1), sinks)
    torch.testing.assert_close(got, expected)
    assert with_sinks(out, scores.logsumexp(-1), None) is out


def leveled_step(seed: int, name: str) -> AttentionStep:
    """A random mixed step (blocks of ``BS``) below nested prefix levels, torch seeded too; for
    the ``reference`` backend every sequence read whole, as the runner gives it."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    step = random_step(rng, BS)
    assert step.levels
    if name == "reference":
        seqs = [replace(s, shared_len=0) for s in step.seqs]
        step = AttentionStep.of(seqs, (), step.num_rows, BS)
    return step


@pytest.mark.parametrize("window", [None, 9, 40])
@pytest.mark.parametrize("name", ["reference", "shared_prefix", "native", "triton"])
@pytest.mark.parametrize("seed", range(3))
def test_every_backend_applies_sinks(seed: int, name: str, window: int | None) -> None:
    """Prefill chunks and decode rows below prefix levels up to 3 deep (1-3 blocks each), read
    as levels by every backend but the reference."""
    step = leveled_step(seed, name)
    cache = KVCache(1, 400, BS, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    attention = backend(name, cache)
    meta = attention.prepare(step)
    # sinks from far below to far above the scores: some rows nearly all sink, some untouched
    sinks = torch.randn(HEADS) * 4
    attn = LayerAttention(window=window, sinks=sinks)
    q = torch.randn(step.num_rows, HEADS, DIM)
    slots = torch.as_tensor(slot_mapping(step))
    k, v = cache.k[0][slots].clone(), cache.v[0][slots].clone()  # rewrites what is there
    got = attention.forward(0, q, k, v, meta, attn)
    expected = dense_attention(q, cache.k[0], cache.v[0], step, DIM**-0.5, attn)
    without = dense_attention(q, cache.k[0], cache.v[0], step, DIM**-0.5, LayerAttention(window))
    assert (expected - without).abs().max() > 0.1  # the sinks change the result
    torch.testing.assert_close(got.double(), expected, rtol=3e-5, atol=3e-5)
