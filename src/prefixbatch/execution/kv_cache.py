"""The paged KV cache.

Layout: one pool per K and V of shape (layers, num_blocks * block_size, kv_heads, head_dim). A
token at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of a layer's pool. The block manager (scheduling) decides which blocks belong to
whom; this module only holds the tensors (``kv_memory.py`` sizes them).
"""

from __future__ import annotations

import math
import mmap

import torch


class KVCache:
    """Preallocated K and V pools."""

    def __init__(
        self,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = zeroed_pool(shape, dtype, device)  # (L, slots, KVH, D)
        self.v = zeroed_pool(shape, dtype, device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(
        layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def zeroed_pool(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zero-filled pool. Zeroed because a padded decode reads the unwritten tail of a
    sequence's last block (masked out, but uninitialised memory could hold NaN, and 0 * NaN
    poisons the softmax sum). On the CPU the pool is a private anonymous mapping: the kernel
    hands out zero pages as they are first written, so a job's resident memory grows with the
    KV it really holds, not with the budget (a 4 GiB default pool costs nothing until used)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:  # mmap cannot map nothing
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the mapping
