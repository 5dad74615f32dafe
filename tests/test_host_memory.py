"""The CPU engine keeps freed activation memory in the process (glibc malloc thresholds)."""

from __future__ import annotations

import ctypes.util
import resource

import pytest
import torch

from prefixbatch.execution.host_memory import keep_freed_memory

glibc = pytest.mark.skipif(
    ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="glibc only",
)


@glibc
def test_buffers_freed_and_allocated_again_do_not_fault_pages_in_again() -> None:
    assert keep_freed_memory()
    size = 16 * 2**20  # above glibc's default mmap threshold (128 KiB)
    torch.empty(size // 4).fill_(1.0)  # the first buffers fault their pages in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        torch.empty(size // 4).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # With glibc's defaults buffers are mmapped or trimmed again (about 32,000 faults here).
    assert faults <= 2 * size // 4096  # at most a buffer's pages again, not 40 times


def test_the_cpu_engine_sets_the_thresholds(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from prefixbatch import LLM

    keep_freed_memory.cache_clear()
    LLM(str(tiny_models["llama"]), device="cpu", kv_cache_memory=2**20)
    assert keep_freed_memory.cache_info().currsize == 1
