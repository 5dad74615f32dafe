"""The paged KV cache.

Layout: one pool per K and V of shape (layers, num_blocks * block_size, kv_heads, head_dim). A
token at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of a layer's pool. The block manager (scheduling) decides which blocks belong to
whom; this module only holds the tensors (``kv_memory.py`` sizes them).
"""

from __future__ import annotations

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
        device: torch.device,
    ) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        # Zeroed: a padded decode reads the unwritten tail of a sequence's last block (masked
        # out, but uninitialised memory could hold NaN, and 0 * NaN poisons the softmax sum).
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, KVH, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(
        layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8
