"""KV pools: GPU sizing (the arithmetic on the CPU, the profiling on CUDA when present) and the
CPU pool's lazily committed zero pages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prefixbatch.config import KVLayout
from prefixbatch.execution.attention.backend import KVCache
from prefixbatch.execution.kv_memory import (
    KVBudgetError,
    MemoryProfile,
    gpu_kv_blocks,
    kv_blocks_from_profile,
)

GIB = 2**30


def test_blocks_are_what_the_budget_leaves_after_the_peak():
    # An H200-like device with the 8B model: 16 GiB weights + 4 GiB activations, 0.5 GiB context.
    profile = MemoryProfile(total=140 * GIB, peak_allocated=20 * GIB, non_torch=GIB // 2)
    per_block = KVCache.bytes_per_block(32, 16, KVLayout(8, 128, 128), torch.bfloat16)
    assert per_block == 2 * 2**20  # 131 KB per token x 16 tokens
    left = int(140 * GIB * 0.9) - 20 * GIB - GIB // 2
    assert kv_blocks_from_profile(profile, 0.9, per_block) == left // per_block
    assert kv_blocks_from_profile(profile, 0.5, per_block) == (70 * GIB - 20.5 * GIB) // per_block
    # One byte short of a second block gives one block.
    tight = MemoryProfile(total=1000, peak_allocated=500, non_torch=0)
    assert kv_blocks_from_profile(tight, 1.0, 499) == 1
    assert kv_blocks_from_profile(tight, 1.0, 250) == 2


def test_nothing_left_raises_a_clear_error():
    profile = MemoryProfile(total=80 * GIB, peak_allocated=75 * GIB, non_torch=GIB)
    with pytest.raises(KVBudgetError, match="no memory left for the KV cache.*75.0 GiB"):
        kv_blocks_from_profile(profile, 0.9, 2**20)
    with pytest.raises(KVBudgetError):  # something left, but less than one block
        kv_blocks_from_profile(MemoryProfile(1000, 500, 0), 0.9, 500)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_blocks_from_profile(profile, 1.5, 2**20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profiling_counts_the_largest_step():
    device = torch.device("cuda")
    per_block = 64 * 2**20
    idle = gpu_kv_blocks(lambda: None, device, per_block, utilization=0.5)
    # A step that peaks at 2 GiB of activations leaves 32 blocks fewer.
    busy = gpu_kv_blocks(
        lambda: torch.empty(2 * GIB, dtype=torch.uint8, device=device), device, per_block, 0.5
    )
    assert idle - busy in (32, 33)


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_cpu_pool_is_zero_and_resident_only_where_written() -> None:
    """A 1 GiB CPU pool reads as zeros and takes memory only for the blocks written; a forked
    child's writes stay in the child (private mapping)."""
    before = _resident_mib()
    cache = KVCache(4, 4096, 16, 8, 64, torch.float16, torch.device("cpu"))  # 2 x 512 MiB
    assert _resident_mib() - before < 64
    assert cache.k.shape == (4, 4096 * 16, 8, 64) and cache.k.dtype == torch.float16
    cache.k[:, :16] = 1.0  # one block of every layer
    assert float(cache.k[:, 16:].abs().max()) == 0.0 and float(cache.v.abs().max()) == 0.0
    assert _resident_mib() - before < 64
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only writes and exits
        cache.v[0, 0, 0, 0] = 7.0  # one element: no OpenMP region after fork
        os._exit(0)
    os.waitpid(child, 0)
    assert float(cache.v.abs().max()) == 0.0
