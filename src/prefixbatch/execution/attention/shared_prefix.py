"""Shared-prefix (cascade) attention in plain PyTorch, after BatchLLM, Hydragen and FlashInfer.

For each prefix segment in a step, the stacked queries of every sequence below it attend to the
segment's KV in one matrix product, so a prefix is read once per step instead of once per
member. Each member then attends causally to its own KV, and all partial results merge through
their log-sum-exp. Rows outside groups go through the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..upload import Staged
from .backend import (
    DecodeBatch,
    PrefillSlice,
    decode_kv,
    slot_mapping,
)
from .reference import ContextPlan, ReferenceBackend, causal_mask
from .step import AttentionStep

# Query rows per prefix matmul: bounds the (KVH, rows * G, P) score tensor on long prefixes.
_PREFIX_ROWS = 512


@dataclass(frozen=True)
class PrefixSegment:
    """One prefix level in this step: positions whose KV every row in ``rows`` reads."""

    slots: torch.Tensor  # (P,) the level's own positions (after its parent level's)
    rows: torch.Tensor  # (Q,) query rows of every sequence below this level


@dataclass(frozen=True)
class SharedPrefixMetadata:
    """Sequences outside levels as in the reference path; sequences below levels as segments
    (read once for all their rows) plus each sequence's own part."""

    slot_mapping: torch.Tensor  # (T,)
    prefills: tuple[PrefillSlice, ...]
    decode: DecodeBatch | None
    segments: tuple[PrefixSegment, ...]
    members: tuple[PrefillSlice, ...]  # own part of member prefill chunks
    member_decode: DecodeBatch | None  # own part of members with one query row


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (n, H, D) against k, v (L, KVH, D) -> out (n, H, D), lse (n, H), both fp32.

    GQA: the G query heads of a KV head are packed into the rows, so k/v are never expanded.
    ``mask`` (n, L) marks attended positions (None: all).
    """
    n, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qg = q.float().view(n, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, n * g, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)) * scale  # (KVH, n*G, L)
    if mask is not None:
        scores = scores.view(kvh, n, g, -1).masked_fill(~mask[None, :, None, :], float("-inf"))
        scores = scores.view(kvh, n * g, -1)
    lse = torch.logsumexp(scores, dim=-1)  # (KVH, n*G)
    out = torch.bmm(torch.exp(scores - lse[..., None]), v.float().transpose(0, 1))  # (KVH, n*G, D)
    out = out.view(kvh, n, g, d).permute(1, 0, 2, 3).reshape(n, h, d)
    return out, lse.view(kvh, n, g).permute(1, 0, 2).reshape(n, h)


def attend_lse_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    d: DecodeBatch,
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence, q (B, H, D), against padded own KV -> (B, H, D), (B, H)."""
    b, h, dim = q.shape
    kvh = k_pool.shape[1]
    k, v = decode_kv(k_pool, v_pool, d, block_size)  # (B, KVH, Lmax, D)
    k, v = k.float(), v.float()
    scores = torch.matmul(q.float().view(b, kvh, h // kvh, dim), k.transpose(-1, -2)) * scale
    # scores: (B, KVH, G, Lmax)
    scores = scores.masked_fill(~d.mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, KVH, G)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v)  # (B, KVH, G, D)
    return out.reshape(b, h, dim), lse.reshape(b, h)


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention partials over disjoint keys: o (n, H, D), lse (n, H).
    ``lse1`` may be -inf (no keys yet); ``lse2`` never is."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    total = w1 + w2
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / total[..., None]
    return o, m + torch.log(total)


class SharedPrefixBackend(ReferenceBackend):
    """Reads each prefix segment once per layer for all query rows below it."""

    shares_prefix = True

    def stage(self, step: AttentionStep) -> Staged[SharedPrefixMetadata]:
        bs = step.block_size
        arrays = {"slots": slot_mapping(step)}
        for i, lvl in enumerate(step.levels):
            blocks = np.asarray(lvl.block_ids, dtype=np.int64)
            arrays[f"seg{i}"] = (blocks[:, None] * bs + np.arange(bs)[None, :]).reshape(-1)
            arrays[f"rows{i}"] = np.arange(lvl.row_start, lvl.row_end, dtype=np.int64)
        plain = np.flatnonzero(step.shared_len == 0)
        members = np.flatnonzero(step.shared_len > 0)
        plain_plan = ContextPlan.build(step, plain, True, arrays)
        member_plan = ContextPlan.build(step, members, True, arrays, tag="m")
        levels = len(step.levels)

        def build(t: dict[str, torch.Tensor]) -> SharedPrefixMetadata:
            segments = tuple(PrefixSegment(t[f"seg{i}"], t[f"rows{i}"]) for i in range(levels))
            return SharedPrefixMetadata(
                t["slots"], *plain_plan.tensors(t), segments, *member_plan.tensors(t)
            )

        return Staged(arrays, build)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: SharedPrefixMetadata,
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        out = self.attend(layer, q, meta.prefills, meta.decode, torch.empty_like(q))
        if not meta.segments:
            return out
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        t, h, d = q.shape
        acc_o = q.new_zeros(t, h, d, dtype=torch.float32)  # running merged output per row
        acc_lse = q.new_full((t, h), float("-inf"), dtype=torch.float32)
        for seg in meta.segments:
            pk = k_pool.index_select(0, seg.slots)  # (P, KVH, D): read once for all rows below
            pv = v_pool.index_select(0, seg.slots)
            for i in range(0, len(seg.rows), _PREFIX_ROWS):
                rows = seg.rows[i : i + _PREFIX_ROWS]
                o, lse = attend_lse(q.index_select(0, rows), pk, pv, None, self.scale)
                acc_o[rows], acc_lse[rows] = merge(acc_o[rows], acc_lse[rows], o, lse)
        for m in meta.members:
            rows = slice(m.q_start, m.q_start + m.q_len)
            mask = causal_mask(m.q_len, len(m.kv_slots), q.device)
            o, lse = attend_lse(
                q[rows],
                k_pool.index_select(0, m.kv_slots),
                v_pool.index_select(0, m.kv_slots),
                mask,
                self.scale,
            )
            out[rows] = merge(acc_o[rows], acc_lse[rows], o, lse)[0].to(out.dtype)
        if meta.member_decode is not None:
            rows = meta.member_decode.rows
            o, lse = attend_lse_decode(
                q[rows], k_pool, v_pool, meta.member_decode, self.scale, self.cache.block_size
            )
            out[rows] = merge(acc_o[rows], acc_lse[rows], o, lse)[0].to(out.dtype)
        return out
