"""The plain PyTorch attention path over block tables: the reference every fast path is tested
against. Prefill chunks attend one sequence at a time through SDPA; decode tokens attend in one
padded SDPA call. A sliding window narrows the masks; soft-capped scores and attention sinks
(which SDPA cannot take) go through the explicit softmax that the shared-prefix path also uses
(``attend_lse``), the sinks applied to its result by its log-sum-exp (``with_sinks``). Values
may be narrower than keys (Dv < D) and may be a lane view of the key pool (multi-head latent
attention's compressed cache); every function here takes both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..upload import Staged
from .backend import (
    FULL_ATTENTION,
    AttentionBackend,
    DecodeBatch,
    LayerAttention,
    PrefillSlice,
    decode_batch,
    decode_kv,
    own_slots,
    slot_mapping,
    with_sinks,
)
from .step import AttentionStep


@dataclass(frozen=True)
class TorchMetadata:
    """Rows split into prefill slices (one SDPA call each) and one decode batch."""

    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    prefills: tuple[PrefillSlice, ...] = ()
    decode: DecodeBatch | None = None


@dataclass(frozen=True)
class ContextPlan:
    """Host-side index arrays for sequences that attend to their own positions
    ``[shared_len, context_len)``: one prefill slice per chunk, one decode batch. Arrays are
    keyed with ``tag`` so several plans travel to the device in one copy (``upload``)."""

    tag: str
    prefill_rows: tuple[tuple[int, int], ...]  # (q_start, q_len) of each prefill chunk
    has_decode: bool

    @classmethod
    def build(
        cls,
        step: AttentionStep,
        which: np.ndarray,
        mask: bool,
        arrays: dict[str, np.ndarray],
        tag: str = "",
    ) -> ContextPlan:
        """Add the index arrays of sequences ``which`` (int indices into the step) to
        ``arrays``: the decode rows' with array operations, one slot array per prefill chunk."""
        single = step.q_len[which] == 1
        decode, prefill = which[single], which[~single]
        prefill_rows = []
        for j, i in enumerate(prefill.tolist()):
            arrays[f"{tag}p{j}"] = own_slots(step, i)
            prefill_rows.append((int(step.q_start[i]), int(step.q_len[i])))
        if len(decode):
            batch = decode_batch(step, decode, mask)
            arrays.update({f"{tag}d_{k}": a for k, a in batch.items()})
        return cls(tag, tuple(prefill_rows), bool(len(decode)))

    def tensors(
        self, t: dict[str, torch.Tensor]
    ) -> tuple[tuple[PrefillSlice, ...], DecodeBatch | None]:
        """The prefill slices and decode batch, from the device tensors of ``upload``."""
        tag = self.tag
        prefills = tuple(
            PrefillSlice(start, n, t[f"{tag}p{j}"])
            for j, (start, n) in enumerate(self.prefill_rows)
        )
        decode = None
        if self.has_decode:
            decode = DecodeBatch(
                t[f"{tag}d_rows"],
                t[f"{tag}d_block_ids"],
                t[f"{tag}d_lengths"],
                t.get(f"{tag}d_mask"),
            )
        return prefills, decode


def causal_mask(
    q_len: int, context: int, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """(q_len, context) bool: query i sits at position context - q_len + i and attends the
    positions up to its own (only the last ``window`` of them with a window)."""
    rows = torch.arange(q_len, device=device)[:, None] + (context - q_len)
    cols = torch.arange(context, device=device)[None, :]
    mask = cols <= rows
    return mask if window is None else mask & (cols > rows - window)


def decode_mask(d: DecodeBatch, block_size: int, window: int | None) -> torch.Tensor:
    """The decode batch's mask (B, 1, 1, NB * block_size) narrowed to each row's last
    ``window`` positions (its query is its last position)."""
    assert d.mask is not None, "padded decode attention needs the batch's mask"
    if window is None:
        return d.mask
    pos = torch.arange(d.block_ids.shape[1] * block_size, device=d.mask.device)
    return d.mask & (pos[None, :] >= (d.lengths[:, None] - window))[:, None, None, :]


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled scores soft-capped: ``softcap * tanh(scores / softcap)`` (Gemma 2), or as they
    are for None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attend_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (n, H, D) against k (L, KVH, D), v (L, KVH, Dv) -> out (n, H, Dv), lse (n, H), both
    fp32.

    GQA: the G query heads of a KV head are packed into the rows, so k/v are never expanded.
    ``mask`` (n, L) marks attended positions (None: all); every row must attend one at least.
    """
    n, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = q.float().view(n, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, n * g, d)
    scores = soft_cap(torch.bmm(qg, k.float().permute(1, 2, 0)) * scale, softcap)
    # scores: (KVH, n*G, L)
    if mask is not None:
        scores = scores.view(kvh, n, g, -1).masked_fill(~mask[None, :, None, :], float("-inf"))
        scores = scores.view(kvh, n * g, -1)
    lse = torch.logsumexp(scores, dim=-1)  # (KVH, n*G)
    out = torch.bmm(torch.exp(scores - lse[..., None]), v.float().transpose(0, 1))  # (KVH, n*G, Dv)
    out = out.view(kvh, n, g, -1).permute(1, 0, 2, 3).reshape(n, h, -1)
    return out, lse.view(kvh, n, g).permute(1, 0, 2).reshape(n, h)


def attend_lse_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    d: DecodeBatch,
    scale: float,
    block_size: int,
    attn: LayerAttention = FULL_ATTENTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence, q (B, H, D), against padded own KV -> (B, H, Dv), (B, H)."""
    b, h, dim = q.shape
    kvh = k_pool.shape[1]
    k, v = decode_kv(k_pool, v_pool, d, block_size)  # (B, KVH, Lmax, D)
    k, v = k.float(), v.float()
    scores = torch.matmul(q.float().view(b, kvh, h // kvh, dim), k.transpose(-1, -2)) * scale
    # scores: (B, KVH, G, Lmax)
    scores = soft_cap(scores, attn.softcap)
    scores = scores.masked_fill(~decode_mask(d, block_size, attn.window), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, KVH, G)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v)  # (B, KVH, G, Dv)
    return out.reshape(b, h, -1), lse.reshape(b, h)


def attend_slice(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    s: PrefillSlice,
    scale: float,
    attn: LayerAttention = FULL_ATTENTION,
) -> torch.Tensor:
    """One sequence's chunk: q (n, H, D) against its gathered KV -> (n, H, Dv). SDPA, unless
    the scores are soft-capped or there are sinks (SDPA has neither): then the explicit
    softmax."""
    k = k_pool.index_select(0, s.kv_slots)  # (L, KVH, D)
    v = v_pool.index_select(0, s.kv_slots)
    mask = causal_mask(s.q_len, len(s.kv_slots), q.device, attn.window)
    if attn.softcap is not None or attn.sinks is not None:
        out, lse = attend_lse(q, k, v, mask, scale, attn.softcap)
        return with_sinks(out, lse, attn.sinks).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )  # (1, H, n, Dv)
    return out[0].transpose(0, 1)


def attend_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    d: DecodeBatch,
    scale: float,
    block_size: int,
    attn: LayerAttention = FULL_ATTENTION,
) -> torch.Tensor:
    """Decode tokens q (B, H, D) against their padded KV -> (B, H, Dv).

    The query heads that share a KV head are folded into the query length, so K/V are never
    expanded: q becomes (B, KVH, G, D) against k (B, KVH, Lmax, D). Soft-capped scores and
    sinks take the explicit softmax (``attend_lse_decode``).
    """
    if attn.softcap is not None or attn.sinks is not None:
        out, lse = attend_lse_decode(q, k_pool, v_pool, d, scale, block_size, attn)
        return with_sinks(out, lse, attn.sinks).to(q.dtype)
    b, h, dim = q.shape
    kv_heads = k_pool.shape[1]
    k, v = decode_kv(k_pool, v_pool, d, block_size)  # (B, KVH, Lmax, D)
    qg = q.view(b, kv_heads, h // kv_heads, dim)
    mask = decode_mask(d, block_size, attn.window)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, -1)


class ReferenceBackend(AttentionBackend):
    """Plain attention: every sequence reads its whole context, prefix included."""

    def stage(self, step: AttentionStep) -> Staged[TorchMetadata]:
        arrays = {"slots": slot_mapping(step)}
        plan = ContextPlan.build(step, np.arange(step.num_seqs), True, arrays)
        return Staged(arrays, lambda t: TorchMetadata(t["slots"], *plan.tensors(t)))

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: TorchMetadata,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        if not meta.prefills and meta.decode is not None:
            # Every row is a decode row, in row order: the decode output is the result as it
            # is, with no gather of the rows' queries and no scatter of their outputs.
            return self.decode(q, self.cache.k[layer], self.cache.v[layer], meta.decode, attn)
        return self.attend(layer, q, meta.prefills, meta.decode, self.new_out(q), attn)

    def new_out(self, q: torch.Tensor) -> torch.Tensor:
        """An uninitialised output for queries q (T, H, D): (T, H, Dv)."""
        return q.new_empty(*q.shape[:2], self.cache.v.shape[-1])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        prefills: Sequence[PrefillSlice],
        decode: DecodeBatch | None,
        out: torch.Tensor,
        attn: LayerAttention,
    ) -> torch.Tensor:
        """Fill ``out`` at the rows of ``prefills`` and ``decode`` (K/V already written)."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        for s in prefills:
            out[s.q_start : s.q_start + s.q_len] = attend_slice(
                q[s.q_start : s.q_start + s.q_len], k_pool, v_pool, s, self.scale, attn
            )
        if decode is not None:
            out[decode.rows] = self.decode(q[decode.rows], k_pool, v_pool, decode, attn)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        d: DecodeBatch,
        attn: LayerAttention,
    ) -> torch.Tensor:
        """The decode batch's rows q (B, H, D) -> (B, H, Dv)."""
        return attend_decode(q, k_pool, v_pool, d, self.scale, self.cache.block_size, attn)
