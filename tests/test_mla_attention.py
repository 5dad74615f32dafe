"""Attention over a compressed (MLA) KV cache: one KV head whose value is the first lanes of its
key, kept once (``KVCache(value_in_key=True)``). Every backend (the PyTorch reference and
cascade, the compiled CPU kernels, the Triton kernels under the interpreter) on random mixed
steps below nested prefix levels, against the dense definition in float64; the cache's layout
and sizes; the registry's choice under auto and its error for a backend forced that cannot
take the head sizes."""

from __future__ import annotations

import pytest
import torch
from test_attention import kernels
from test_attention_sinks import BS, leveled_step

from conftest import dense_attention
from prefixbatch.config import KVLayout
from prefixbatch.execution.attention.backend import AttentionBackend, slot_mapping
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.reference import ReferenceBackend
from prefixbatch.execution.attention.registry import BackendUnavailableError, select_backend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.triton_backend import triton_available
from prefixbatch.execution.kv_cache import KVCache

RANK, ROPE = 32, 16  # a latent of 32 lanes and a rotary key of 16: a key of 48
SCALE = 0.3


def latent_cache(blocks: int = 400, dtype: torch.dtype = torch.float32) -> KVCache:
    cache = KVCache.of_layout(
        1, blocks, BS, KVLayout(1, RANK + ROPE, RANK, value_in_key=True), dtype, "cpu"
    )
    cache.k.normal_()
    return cache


def backend(name: str, cache: KVCache, heads: int) -> AttentionBackend:
    if name == "reference":
        return ReferenceBackend(cache, heads, SCALE)
    if name == "shared_prefix":
        return SharedPrefixBackend(cache, heads, SCALE)
    if name == "native":
        return CpuBackend(cache, heads, SCALE, kernels())
    if not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    from prefixbatch.execution.attention.triton_backend import TritonBackend

    return TritonBackend(cache, heads, SCALE)


def test_the_value_is_a_view_of_the_key_stored_once() -> None:
    layout = KVLayout(1, RANK + ROPE, RANK, value_in_key=True)
    cache = latent_cache(blocks=4)
    assert cache.v.shape == (1, 4 * BS, 1, RANK)
    assert cache.v.data_ptr() == cache.k.data_ptr()
    cache.k[0, 3, 0, 5] = 7.0
    assert float(cache.v[0, 3, 0, 5]) == 7.0
    assert cache.nbytes == 4 * BS * (RANK + ROPE) * 4
    assert cache.nbytes == KVCache.bytes_per_block(1, BS, layout, torch.float32) * 4
    # K and V apart (a GQA layout) count both
    assert KVLayout(2, 64, 64).bytes_per_token(3, torch.bfloat16) == 3 * 2 * 128 * 2
    with pytest.raises(ValueError, match="a value of 64 lanes in a key of 48"):
        KVCache(1, 1, BS, 1, 48, torch.float32, "cpu", value_dim=64, value_in_key=True)


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("reference", 8),
        ("shared_prefix", 8),
        ("native", 8),
        ("native", 5),
        ("triton", 8),
        ("triton", 48),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_latent_attention_matches_the_dense_definition(seed: int, name: str, heads: int) -> None:
    """Prefill chunks and decode rows below prefix levels up to 3 deep, read as levels by every
    backend but the reference; the step's new keys written through the backend (its value with
    it, as the key's first lanes). 5 query heads: a lane chunk of the CPU kernels part empty;
    48: Triton splits them over 3 programs of 16."""
    step = leveled_step(seed, name)
    cache = latent_cache()
    attention = backend(name, cache, heads)
    meta = attention.prepare(step)
    q = torch.randn(step.num_rows, heads, RANK + ROPE)
    slots = torch.as_tensor(slot_mapping(step))
    k = torch.randn(step.num_rows, 1, RANK + ROPE)
    got = attention.forward(0, q, k, k[..., :RANK], meta)
    assert torch.equal(cache.k[0][slots], k)  # written, the value with it
    expected = dense_attention(q, cache.k[0], cache.v[0], step, SCALE)
    assert got.shape == (step.num_rows, heads, RANK)
    torch.testing.assert_close(got.double(), expected, rtol=3e-5, atol=3e-5)


def test_auto_picks_the_cpu_kernels_and_a_backend_that_cannot_says_why() -> None:
    cache = latent_cache(blocks=4)
    assert isinstance(select_backend("auto", cache, 8, SCALE), CpuBackend)
    odd = KVCache.of_layout(1, 4, BS, KVLayout(1, 40, 24, value_in_key=True), torch.float32, "cpu")
    assert isinstance(select_backend("auto", odd, 8, SCALE), CpuBackend)
    if triton_available(torch.device("cpu")):  # its tiles take powers of two: not 40 = 24 + 16
        with pytest.raises(
            BackendUnavailableError, match="'triton'.*40 lanes, values of 24, kept.*powers of two"
        ):
            select_backend("triton", odd, 8, SCALE)
