"""The CPU engine keeps freed activation memory in the process (glibc malloc thresholds)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from prefixbatch.execution.host_memory import keep_freed_memory

glibc = pytest.mark.skipif(
    ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="glibc only",
)


# A forward's activations: several buffers of a few MiB alive, then all freed, step after step.
# Run in a fresh interpreter, so the heap starts as a new engine process's does. The control run
# sets glibc's default mmap threshold (128 KiB) explicitly, which turns off its dynamic threshold:
# left on, that threshold sometimes rises after the first frees and the heap settles by chance.
STEPS = """
import ctypes, resource, sys, torch
from prefixbatch.execution.host_memory import M_MMAP_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 2**10)
size = 16 * 2**20  # above glibc's default mmap threshold (128 KiB)
def step():
    buffers = [torch.empty(size // 4).fill_(1.0) for _ in range(4)]
    del buffers
for _ in range(5):
    step()  # the first steps fault their pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@glibc
def test_a_step_s_buffers_freed_and_allocated_again_do_not_fault_pages_in_again() -> None:
    pages = 16 * 2**20 // 4096
    kept, default = page_faults("keep"), page_faults("default")
    # Kept, the heap has settled after the first steps: no buffer is faulted in again. With
    # glibc's static defaults every buffer is a fresh mmap, faulted in at every step.
    assert kept < pages // 4
    assert default >= 20 * 4 * pages


def test_the_cpu_engine_sets_the_thresholds(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from prefixbatch import LLM

    keep_freed_memory.cache_clear()
    LLM(str(tiny_models["llama"]), device="cpu", kv_cache_memory=2**20)
    assert keep_freed_memory.cache_info().currsize == 1
