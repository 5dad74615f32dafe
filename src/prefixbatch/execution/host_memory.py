"""Keep freed host memory in the process instead of handing it back to the kernel (glibc).

A CPU forward allocates and frees many activation buffers of a few MiB per layer. glibc's malloc
serves blocks above its mmap threshold with fresh ``mmap`` pages and trims freed heap top back to
the kernel, so the next step page-faults the same memory in again (zeroed by the kernel): in a
16-request job here about 640,000 minor faults and a second of system time. vLLM's CPU backend
avoids this by preloading tcmalloc; prefixbatch sets glibc's thresholds instead (``mallopt``,
glibc manual "Memory Allocation Tunables"), which needs no extra library. The process then keeps
its peak heap for reuse, which a batch engine wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): 32 MiB.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = -1  # never trim (glibc: -1 disables trimming)


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C
    library is not glibc (musl, macOS) or refuses, which changes nothing else."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("glibc malloc thresholds %s", "raised" if done else "unchanged")
    return done
