"""The paged KV cache.

Layout: one pool per K and V of shape (layers, num_blocks * block_size, kv_heads, head_dim) (V:
``value_dim`` lanes). With ``value_in_key`` there is one pool: V is a view of the first
``value_dim`` lanes of K (multi-head latent attention keeps per token only the latent ``c_kv``
and the roped ``k_pe``, ``KVLayout``), so nothing is stored twice. A
token at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of a layer's pool. The block manager (scheduling) decides which blocks belong to
whom; this module only holds the tensors (``kv_memory.py`` sizes them).
"""

from __future__ import annotations

import math
import mmap

import torch

from ..config import KVLayout


class KVCache:
    """Preallocated K and V pools: ``k`` (L, slots, KVH, head_dim) and ``v``
    (L, slots, KVH, value_dim), a strided view of ``k`` when ``value_in_key`` (then only ``k``
    is written). ``value_dim`` defaults to ``head_dim``."""

    def __init__(
        self,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        value_dim: int | None = None,
        value_in_key: bool = False,
    ) -> None:
        value_dim = head_dim if value_dim is None else value_dim
        if value_in_key and value_dim > head_dim:
            raise ValueError(f"a value of {value_dim} lanes in a key of {head_dim}")
        slots = num_blocks * block_size
        self.k = zeroed_pool((layers, slots, kv_heads, head_dim), dtype, device)
        if value_in_key:
            self.v = self.k[..., :value_dim]
        else:
            self.v = zeroed_pool((layers, slots, kv_heads, value_dim), dtype, device)
        self.value_in_key = value_in_key
        self.block_size = block_size
        self.num_blocks = num_blocks

    @classmethod
    def of_layout(
        cls,
        layers: int,
        num_blocks: int,
        block_size: int,
        layout: KVLayout,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """The cache a model's ``KVLayout`` asks for."""
        return cls(
            layers, num_blocks, block_size, layout.kv_heads, layout.head_dim, dtype, device,
            layout.value_dim, layout.value_in_key,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes of the pools (V counted only where it is stored apart from K)."""
        v_bytes = 0 if self.value_in_key else self.v.numel() * self.v.element_size()
        return self.k.numel() * self.k.element_size() + v_bytes

    @staticmethod
    def bytes_per_block(layers: int, block_size: int, layout: KVLayout, dtype: torch.dtype) -> int:
        """Bytes of one block of ``block_size`` tokens over ``layers`` layers."""
        return block_size * layout.bytes_per_token(layers, dtype)


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
