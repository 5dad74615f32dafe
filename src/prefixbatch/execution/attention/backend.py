"""The attention backend interface, and the index arithmetic every paged backend shares.

A backend receives the step in device-neutral terms (``AttentionStep``), turns it once per step
into its own metadata (``stage``: host arrays built with array operations, then the metadata from
their device copies; ``prepare`` does both), and then, for every layer, writes the step's new K/V
into the paged cache and computes attention for every row (``forward``). Backends are chosen through
``registry.py``; the plain PyTorch ``ReferenceBackend`` is the contract every fast path is tested
against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..kv_cache import KVCache
from ..upload import Staged, upload
from .step import AttentionStep


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention adds to causal softmax attention; every backend applies it.

    ``window`` (None: global attention): a query at position ``p`` attends only to keys at
    positions ``(p - window, p]`` (sliding-window attention: Mistral, Gemma 2/3; Hugging Face's
    mask ``kv_idx > q_idx - sliding_window``). ``softcap`` (None: off): each scaled score ``s``
    becomes ``softcap * tanh(s / softcap)`` before the softmax (Gemma 2's
    ``attn_logit_softcapping``). ``sinks`` (None: off): attention sinks, one learned logit
    per query head, (H,) fp32 on the cache's device, that joins each query's softmax
    denominator and attends no value (gpt-oss; Xiao et al., 2024, "Efficient Streaming
    Language Models with Attention Sinks"): a row's output over keys with log-sum-exp ``lse``
    becomes ``out * sigmoid(lse - sink)`` (``with_sinks``), applied once after every partial
    of the row is merged. Raises ValueError for a window below 1 or a cap not above 0.
    """

    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"a sliding window of {self.window} positions")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"a soft-cap of {self.softcap}")


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """A row's attention over all its keys, out (n, H, D) fp32 with its log-sum-exp lse (n, H),
    -> the same with the sinks (H,) in the softmax denominator: ``out * sigmoid(lse - sink)``
    (= out * e^lse / (e^lse + e^sink)); ``out`` as it is for None."""
    if sinks is None:
        return out
    return out * torch.sigmoid(lse - sinks)[..., None]


FULL_ATTENTION = LayerAttention()


class AttentionBackend(ABC):
    """Writes a step's new K/V into the paged cache and computes attention for every row.

    Contract: ``forward`` gets q (T, H, D), k (T, KVH, D) and v (T, KVH, Dv) for the flattened
    step and returns (T, H, Dv): for each row, exact softmax attention (scores ``scale * q . k``)
    over the positions its sequence attends
    (causal, within the layer's window, scores soft-capped, sinks in the denominator:
    ``LayerAttention``), whatever way the
    backend splits the work (prefix levels read once per group and merged by log-sum-exp, or the
    whole context per row). A sliding layer reads only the window of a shared prefix: a level
    wholly before a row's window adds nothing to that row. The value may be narrower than the
    key (Dv < D), and where the cache keeps it in the key (``KVCache.value_in_key``: multi-head
    latent attention's one latent head) v is k's first Dv lanes and only k is written (the
    registry lists which backends read such a cache: ``BackendEntry.value_dims``).

    ``shares_prefix``: whether the backend reads prefix levels once for all rows below them (the
    runner then describes the step's levels for sequences whose shared prefix has at least
    ``min_shared_prefix`` tokens, unless the engine config sets its own threshold); otherwise
    every row reads its whole context.
    Backends that support CUDA-graph capture of decode steps also implement the graph hooks
    (``execution/cuda_graphs.py``).
    """

    shares_prefix = False
    min_shared_prefix = 256

    def __init__(self, cache: KVCache, num_heads: int, scale: float) -> None:
        self.cache = cache
        self.num_heads = num_heads
        self.scale = scale

    @abstractmethod
    def stage(self, step: AttentionStep) -> Staged[Any]:
        """The host arrays of one step's metadata and how to build it from their device copies
        (built once per step, read by every layer)."""

    def prepare(self, step: AttentionStep) -> Any:
        """The backend's metadata for one step, its arrays copied to the cache's device."""
        staged = self.stage(step)
        return staged.build(upload(staged.arrays, self.cache.k.device))

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor: ...

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store the step's new k (T, KVH, D), v (T, KVH, Dv) at ``slots`` (T,) of the layer's
        pools (k alone where the value is part of the key)."""
        self.cache.k[layer].index_copy_(0, slots, k)
        if not self.cache.value_in_key:
            self.cache.v[layer].index_copy_(0, slots, v)


def padded_rows(rows: Sequence[Sequence[int]], dtype: type = np.int64) -> np.ndarray:
    """Ragged int rows (lists or arrays) -> (len(rows), max(1, longest)) array of ``dtype``,
    padded with 0. One assignment per row: for a few rows (prefix levels), not per sequence."""
    out = np.zeros((len(rows), max([1, *map(len, rows)])), dtype=dtype)
    for i, xs in enumerate(rows):
        out[i, : len(xs)] = xs
    return out


def query_positions(step: AttentionStep) -> tuple[np.ndarray, np.ndarray]:
    """(sequence index, position) of every row of the step, each (T,) int64."""
    seq_of_row = np.repeat(np.arange(step.num_seqs), step.q_len)
    offset = step.q_start - (step.context_len - step.q_len)  # row - position, per sequence
    return seq_of_row, np.arange(step.num_rows, dtype=np.int64) - offset[seq_of_row]


def own_slots(step: AttentionStep, i: int) -> np.ndarray:
    """(context_len - shared_len,) int64 cache slots of the positions sequence ``i`` attends
    itself, ``[shared_len, context_len)``."""
    bs = step.block_size
    pos = np.arange(step.shared_len[i], step.context_len[i])
    own = step.own_tables(np.array([i]))[0]
    return own[pos // bs - step.shared_len[i] // bs].astype(np.int64) * bs + pos % bs


def slot_mapping(step: AttentionStep) -> np.ndarray:
    """(T,) int64 slot where each row's new K/V is written (new tokens follow ``shared_len``,
    so a sequence's own blocks hold them): one lookup per row in the step's block tables."""
    seq, pos = query_positions(step)
    bs = step.block_size
    col = pos // bs - step.shared_len[seq] // bs
    return step.tables[step.table_rows[seq], col].astype(np.int64) * bs + pos % bs


def decode_batch(step: AttentionStep, which: np.ndarray, mask: bool) -> dict[str, np.ndarray]:
    """Index arrays of the decode rows ``which`` (sequences with one query row) reading their
    own positions ``[shared_len, context_len)``: rows, block_ids, lengths and, with ``mask``,
    the (B, 1, 1, NB * block_size) mask of the positions attended."""
    out = {
        "rows": step.q_start[which],
        "block_ids": step.own_tables(which, pad_first=True).astype(np.int64),
        "lengths": step.context_len[which] - step.shared_len[which],
    }
    if mask:
        width = out["block_ids"].shape[1] * step.block_size
        attended = np.arange(width)[None, :] < out["lengths"][:, None]
        out["mask"] = attended[:, None, None, :]
    return out


@dataclass(frozen=True)
class PrefillSlice:
    """One sequence whose step carries several query tokens (a prefill chunk).

    Its queries are rows ``[q_start, q_start + q_len)``; they are the last ``q_len`` of the
    ``len(kv_slots)`` positions it attends (causal with that offset).
    """

    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # (context,) slot of each attended position


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences with one query token each, attended in one call.

    KV is read a whole block at a time; ``mask`` (only for padded attention) marks the positions
    each row attends.
    """

    rows: torch.Tensor  # (B,) row of each query token in the flattened batch
    block_ids: torch.Tensor  # (B, NB) blocks of each sequence, padded with its first block
    lengths: torch.Tensor  # (B,) positions attended, from the first of its blocks
    mask: torch.Tensor | None = None  # (B, 1, 1, NB * block_size) True where attended


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """pool (slots, KVH, D), contiguous or a lane view of one (a value kept in the key),
    block_ids (B, NB) -> (B, NB * block_size, KVH, D) contiguous."""
    b, nb = block_ids.shape
    blocks = pool.unflatten(0, (-1, block_size))  # (blocks, block_size, KVH, D)
    return blocks.index_select(0, block_ids.flatten()).view(b, nb * block_size, *pool.shape[1:])


def decode_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, d: DecodeBatch, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode batch's padded K and V, (B, KVH, Lmax, D) and (B, KVH, Lmax, Dv)."""
    k = gather_blocks(k_pool, d.block_ids, block_size).transpose(1, 2)
    v = gather_blocks(v_pool, d.block_ids, block_size).transpose(1, 2)
    return k, v
