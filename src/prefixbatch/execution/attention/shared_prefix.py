"""Shared-prefix attention in plain PyTorch (BatchLLM / Hydragen / cascade attention).

For each group in a step, the stacked queries of all members attend to the group's prefix KV in
one matrix product, so the prefix is read once per group per step instead of once per member.
Each member then attends causally to its own KV, and the two partial results are merged through
their log-sum-exp. Rows outside groups go through the reference path.
"""

from __future__ import annotations

import torch

from .backend import StepMetadata
from .reference import ReferenceBackend, causal_mask

# Query rows per prefix matmul: bounds the (KVH, rows * G, P) score tensor on long prefixes.
_PREFIX_ROWS = 512


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (n, H, D) against k, v (L, KVH, D) -> out (n, H, D), lse (n, H) in fp32.

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


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
          lse2: torch.Tensor) -> torch.Tensor:
    """Combine two attention partials over disjoint keys: o (n, H, D), lse (n, H)."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]


class SharedPrefixBackend(ReferenceBackend):
    """Reads each group's prefix KV once per layer for all of the group's query rows."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: StepMetadata) -> torch.Tensor:
        plain = StepMetadata(meta.slot_mapping, meta.logits_rows, meta.prefills, meta.decode)
        out = super().forward(layer, q, k, v, plain)  # writes K/V, covers non-group rows
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        for g in meta.groups:
            pk = k_pool.index_select(0, g.prefix_slots)  # (P, KVH, D): read once for the group
            pv = v_pool.index_select(0, g.prefix_slots)
            qs = q.index_select(0, g.rows)  # (Q, H, D) every member's queries, stacked
            parts = [attend_lse(qs[i : i + _PREFIX_ROWS], pk, pv, None, self.scale)
                     for i in range(0, len(qs), _PREFIX_ROWS)]
            o_prefix = torch.cat([p[0] for p in parts])
            lse_prefix = torch.cat([p[1] for p in parts])
            row = 0
            for m in g.members:
                own_k = k_pool.index_select(0, m.kv_slots)
                own_v = v_pool.index_select(0, m.kv_slots)
                mask = causal_mask(m.q_len, len(m.kv_slots), q.device) if m.q_len > 1 else None
                o_own, lse_own = attend_lse(q[m.q_start : m.q_start + m.q_len], own_k, own_v,
                                            mask, self.scale)
                merged = merge(o_prefix[row : row + m.q_len], lse_prefix[row : row + m.q_len],
                               o_own, lse_own)
                out[m.q_start : m.q_start + m.q_len] = merged.to(out.dtype)
                row += m.q_len
        return out
