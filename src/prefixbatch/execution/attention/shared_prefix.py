"""Shared-prefix (cascade) attention in plain PyTorch, after BatchLLM, Hydragen and FlashInfer.

For each prefix segment in a step, the stacked queries of every sequence below it attend to the
segment's KV in one matrix product, so a prefix is read once per step instead of once per
member. Each member then attends causally to its own KV, and all partial results merge through
their log-sum-exp. Rows outside groups go through the reference path. In a sliding-window layer
a segment is read only by the rows whose window reaches into it, masked to the window. Sinks
join a member row's result once, after its last merge (``with_sinks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..upload import Staged
from .backend import (
    FULL_ATTENTION,
    DecodeBatch,
    LayerAttention,
    PrefillSlice,
    query_positions,
    slot_mapping,
    with_sinks,
)
from .reference import ContextPlan, ReferenceBackend, attend_lse, attend_lse_decode, causal_mask
from .step import AttentionStep

# Query rows per prefix matmul: bounds the (KVH, rows * G, P) score tensor on long prefixes.
_PREFIX_ROWS = 512


@dataclass(frozen=True)
class PrefixSegment:
    """One prefix level in this step: positions whose KV every row in ``rows`` reads."""

    slots: torch.Tensor  # (P,) the level's own positions (after its parent level's)
    rows: torch.Tensor  # (Q,) query rows of every sequence below this level
    start: int  # the position of its first slot


@dataclass(frozen=True)
class SharedPrefixMetadata:
    """Sequences outside levels as in the reference path; sequences below levels as segments
    (read once for all their rows) plus each sequence's own part."""

    slot_mapping: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,) each row's query position
    prefills: tuple[PrefillSlice, ...]
    decode: DecodeBatch | None
    segments: tuple[PrefixSegment, ...]
    members: tuple[PrefillSlice, ...]  # own part of member prefill chunks
    member_decode: DecodeBatch | None  # own part of members with one query row


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention partials over disjoint keys: o (n, H, Dv), lse (n, H).
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
        arrays = {"slots": slot_mapping(step), "positions": query_positions(step)[1]}
        for i, lvl in enumerate(step.levels):
            blocks = np.asarray(lvl.block_ids, dtype=np.int64)
            arrays[f"seg{i}"] = (blocks[:, None] * bs + np.arange(bs)[None, :]).reshape(-1)
            arrays[f"rows{i}"] = np.arange(lvl.row_start, lvl.row_end, dtype=np.int64)
        plain = np.flatnonzero(step.shared_len == 0)
        members = np.flatnonzero(step.shared_len > 0)
        plain_plan = ContextPlan.build(step, plain, True, arrays)
        member_plan = ContextPlan.build(step, members, True, arrays, tag="m")
        starts = [lvl.start for lvl in step.levels]

        def build(t: dict[str, torch.Tensor]) -> SharedPrefixMetadata:
            segments = tuple(
                PrefixSegment(t[f"seg{i}"], t[f"rows{i}"], start) for i, start in enumerate(starts)
            )
            plain, members = plain_plan.tensors(t), member_plan.tensors(t)
            return SharedPrefixMetadata(t["slots"], t["positions"], *plain, segments, *members)

        return Staged(arrays, build)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: SharedPrefixMetadata,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        out = self.attend(layer, q, meta.prefills, meta.decode, self.new_out(q), attn)
        if not meta.segments:
            return out
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        t, h, dv = out.shape
        acc_o = q.new_zeros(t, h, dv, dtype=torch.float32)  # running merged output per row
        acc_lse = q.new_full((t, h), float("-inf"), dtype=torch.float32)
        for seg in meta.segments:
            pk = k_pool.index_select(0, seg.slots)  # (P, KVH, D): read once for all rows below
            pv = pk[..., :dv] if self.cache.value_in_key else v_pool.index_select(0, seg.slots)
            seg_rows, mask = self.segment_rows(seg, meta.positions, attn.window)
            for i in range(0, len(seg_rows), _PREFIX_ROWS):
                rows = seg_rows[i : i + _PREFIX_ROWS]
                part = None if mask is None else mask[i : i + _PREFIX_ROWS]
                o, lse = attend_lse(q.index_select(0, rows), pk, pv, part, self.scale, attn.softcap)
                acc_o[rows], acc_lse[rows] = merge(acc_o[rows], acc_lse[rows], o, lse)
        for m in meta.members:
            rows = slice(m.q_start, m.q_start + m.q_len)
            mask = causal_mask(m.q_len, len(m.kv_slots), q.device, attn.window)
            o, lse = attend_lse(
                q[rows],
                k_pool.index_select(0, m.kv_slots),
                v_pool.index_select(0, m.kv_slots),
                mask,
                self.scale,
                attn.softcap,
            )
            out[rows] = with_sinks(*merge(acc_o[rows], acc_lse[rows], o, lse), attn.sinks).to(
                out.dtype
            )
        if meta.member_decode is not None:
            rows = meta.member_decode.rows
            o, lse = attend_lse_decode(
                q[rows], k_pool, v_pool, meta.member_decode, self.scale, self.cache.block_size, attn
            )
            out[rows] = with_sinks(*merge(acc_o[rows], acc_lse[rows], o, lse), attn.sinks).to(
                out.dtype
            )
        return out

    @staticmethod
    def segment_rows(
        seg: PrefixSegment, positions: torch.Tensor, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows that read a segment and their mask (Q', P) over its positions (None: all):
        with a window, only the rows whose window ``(p - window, p]`` reaches into it."""
        if window is None:
            return seg.rows, None
        first = positions[seg.rows] - window + 1  # each row's first visible position
        keys = seg.start + torch.arange(len(seg.slots), device=positions.device)
        reached = first <= seg.start + len(seg.slots) - 1
        return seg.rows[reached], keys[None, :] >= first[reached, None]
