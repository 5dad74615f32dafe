"""The CPU decode-attention kernel (``csrc/paged_decode.cpp``), compiled on first use.

It reads each sequence's K/V straight from the paged pool, so a decode step does not copy every
context into a padded batch first (that copy plus SDPA was about a sixth of a decode step). The
build (about 20 s, once per machine and source version) goes to ``$PREFIXBATCH_CACHE``; without
a C++ compiler, or with ``kernels="torch"``, the engine keeps the plain PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ...loading.model_source import cache_root
from ..kv_cache import KVCache
from .backend import DecodeBatch
from .reference import ReferenceBackend

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
# -ffast-math lets the compiler vectorise exp and the dot-product reductions; the kernel keeps
# every value finite for it. -march=native: the build is keyed by this machine's CPU below.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

log = logging.getLogger(__name__)

PagedDecode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _build_name() -> str:
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_flags().encode()
    key += torch.__version__.encode()
    return "prefixbatch_paged_decode_" + hashlib.sha256(key).hexdigest()[:12]


@functools.cache
def paged_decode_kernel() -> PagedDecode | None:
    """The compiled ``paged_decode(q, k_pool, v_pool, block_tables, lengths, block_size, scale)``
    -> (out, lse), or None (the build failed: a warning says why)."""
    try:
        import ninja  # the pip package ships the binary torch's builder calls

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load

    name = _build_name()
    build_dir = cache_root() / "torch_extensions" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):
            log.info("compiling the CPU attention kernel (once, about 20 s) into %s", build_dir)
        module = load(
            name,
            [str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except Exception as err:  # no compiler, headers or cache dir: the PyTorch path still works
        warnings.warn(
            f"prefixbatch: the CPU decode-attention kernel could not be built ({err}); "
            "using the slower PyTorch path",
            stacklevel=2,
        )
        return None
    return module.paged_decode


class NativeDecodeBackend(ReferenceBackend):
    """Decode rows through the compiled kernel, prefill chunks through SDPA's fused CPU kernel.

    Prefix groups need no segments here: a group's members sit next to each other in a step
    and the kernel takes them one after another, so the prefix blocks come from DRAM once and
    from cache for the other members; a prefill chunk is bound by its score FLOPs, which a
    cascade split does not reduce (on the CPU its extra ops made prefill steps ~25% slower).
    """

    decode_mask = False  # the kernel stops at each row's length; no padding to mask

    def __init__(self, cache: KVCache, num_heads: int, scale: float, kernel: PagedDecode) -> None:
        super().__init__(cache, num_heads, scale)
        self.kernel = kernel

    def decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, d: DecodeBatch
    ) -> torch.Tensor:
        # A pybind call the profiler would not see; the named range makes it show.
        with torch.profiler.record_function("prefixbatch::paged_decode"):
            out, _ = self.kernel(
                q.contiguous(),
                k_pool,
                v_pool,
                d.block_ids,
                d.lengths,
                self.cache.block_size,
                self.scale,
            )
        return out
