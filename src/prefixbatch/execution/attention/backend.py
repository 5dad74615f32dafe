"""The paged KV cache, the per-step attention metadata, and the backend interface.

Layout: one pool per K and V of shape (layers, num_blocks, block_size, kv_heads, head_dim). A token
at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of the flattened (num_blocks * block_size) view.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class KVCache:
    """Preallocated K and V pools; the block manager decides which blocks belong to whom."""

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


@dataclass(frozen=True)
class PrefillSlice:
    """One sequence whose step carries several query tokens (a prefill chunk).

    Its queries are rows ``[q_start, q_start + q_len)``; they are the last ``q_len`` of the
    ``len(kv_slots)`` positions it has after this step (causal with that offset).
    """

    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # (context,) slot of each position 0..context-1


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences with one query token each, attended in one padded call.

    KV is gathered a whole block at a time (a contiguous copy, several times faster than a
    gather per slot); ``mask`` marks the positions each row attends.
    """

    rows: torch.Tensor  # (B,) row of each query token in the flattened batch
    block_ids: torch.Tensor  # (B, NB) blocks of each sequence, padded with its first block
    mask: torch.Tensor  # (B, 1, 1, NB * block_size) True where a position is attended
    lengths: torch.Tensor  # (B,) positions attended, from the first of its blocks


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """pool (slots, KVH, D), block_ids (B, NB) -> (B, NB * block_size, KVH, D)."""
    b, nb = block_ids.shape
    blocks = pool.view(-1, block_size * pool.shape[1] * pool.shape[2])
    return blocks.index_select(0, block_ids.flatten()).view(b, nb * block_size, *pool.shape[1:])


def decode_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, d: DecodeBatch, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode batch's padded K and V, each (B, KVH, Lmax, D)."""
    k = gather_blocks(k_pool, d.block_ids, block_size).transpose(1, 2)
    v = gather_blocks(v_pool, d.block_ids, block_size).transpose(1, 2)
    return k, v


@dataclass(frozen=True)
class PrefixSegment:
    """One level of shared prefix in this step: positions whose KV every row in ``rows`` reads.

    A request below nested levels has one segment per level (system prompt, then document); its
    own KV after the deepest level is described by a ``PrefillSlice`` in ``StepMetadata.members``.
    """

    slots: torch.Tensor  # (P,) the level's own positions (after its parent level's)
    rows: torch.Tensor  # (Q,) query rows of every scheduled sequence below this level


@dataclass(frozen=True)
class StepMetadata:
    """What one forward step needs beyond token ids and positions."""

    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    logits_rows: torch.Tensor  # (S,) rows whose logits are sampled (a row may repeat)
    prefills: tuple[PrefillSlice, ...] = ()
    decode: DecodeBatch | None = None
    segments: tuple[PrefixSegment, ...] = ()
    # Own part of each sequence whose rows are in segments: kv_slots start after its prefix.
    members: tuple[PrefillSlice, ...] = ()
    member_decode: DecodeBatch | None = None  # members with one query row, own part batched


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache and computes attention for every row.

    Contract: ``forward`` gets q (T, H, D), k and v (T, KVH, D) for the flattened step and returns
    (T, H, D). Every row is covered exactly once by a prefill slice, the decode batch, a member
    slice or the member decode batch; member rows also attend to the prefix segments that list
    them, and the partial results are merged (an exact softmax over the union of the keys).
    """

    # Whether the backend computes prefix-group members as shared prefix segments plus their
    # own KV (the runner then describes them so); otherwise every row reads its whole context.
    shares_prefix = False

    def __init__(self, cache: KVCache, num_heads: int, scale: float) -> None:
        self.cache = cache
        self.num_heads = num_heads
        self.scale = scale

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.cache.k[layer].index_copy_(0, slots, k)
        self.cache.v[layer].index_copy_(0, slots, v)

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor: ...
