"""The CPU decode-attention kernel (``csrc/paged_decode.cpp``), compiled on first use.

It reads each sequence's K/V straight from the paged pool, so a decode step does not copy every
context into a padded batch first (that copy plus SDPA was about a sixth of a decode step). The
build (``native_build.py``) happens once per machine and source version; without a C++
compiler, or with ``kernels="torch"``, the engine keeps the plain PyTorch path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..kv_cache import KVCache
from ..native_build import build_extension
from .backend import DecodeBatch
from .reference import ReferenceBackend

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"

PagedDecode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def paged_decode_kernel() -> PagedDecode | None:
    """The compiled ``paged_decode(q, k_pool, v_pool, block_tables, lengths, block_size, scale)``
    -> (out, lse), or None (the build failed: a warning says why)."""
    module = build_extension(SOURCE, "the CPU attention kernel")
    return None if module is None else module.paged_decode


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
