"""The plain PyTorch attention path over block tables: the reference every fast path is tested
against. Prefill chunks attend one sequence at a time; decode tokens attend in one padded call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import AttentionBackend, DecodeBatch, PrefillSlice, StepMetadata, decode_kv


def causal_mask(q_len: int, context: int, device: torch.device) -> torch.Tensor:
    """(q_len, context) bool: query i sits at position context - q_len + i."""
    rows = torch.arange(q_len, device=device)[:, None] + (context - q_len)
    return torch.arange(context, device=device)[None, :] <= rows


def attend_slice(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, s: PrefillSlice, scale: float
) -> torch.Tensor:
    """One sequence's chunk: q (n, H, D) against its gathered KV -> (n, H, D)."""
    k = k_pool.index_select(0, s.kv_slots).transpose(0, 1)  # (KVH, L, D)
    v = v_pool.index_select(0, s.kv_slots).transpose(0, 1)
    mask = causal_mask(s.q_len, len(s.kv_slots), q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )  # (1, H, n, D)
    return out[0].transpose(0, 1)


def attend_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    d: DecodeBatch,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """Decode tokens q (B, H, D) against their padded KV -> (B, H, D).

    The query heads that share a KV head are folded into the query length, so K/V are never
    expanded: q becomes (B, KVH, G, D) against k (B, KVH, Lmax, D).
    """
    b, h, dim = q.shape
    kv_heads = k_pool.shape[1]
    k, v = decode_kv(k_pool, v_pool, d, block_size)  # (B, KVH, Lmax, D)
    qg = q.view(b, kv_heads, h // kv_heads, dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=d.mask, scale=scale)
    return out.reshape(b, h, dim)


class ReferenceBackend(AttentionBackend):
    """Plain attention: every sequence reads its whole context, prefix included."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        out = torch.empty_like(q)
        for s in meta.prefills:
            out[s.q_start : s.q_start + s.q_len] = attend_slice(
                q[s.q_start : s.q_start + s.q_len], k_pool, v_pool, s, self.scale
            )
        if meta.decode is not None:
            out[meta.decode.rows] = self.decode(q[meta.decode.rows], k_pool, v_pool, meta.decode)
        return out

    def decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, d: DecodeBatch
    ) -> torch.Tensor:
        """The decode batch's rows q (B, H, D) -> (B, H, D)."""
        return attend_decode(q, k_pool, v_pool, d, self.scale, self.cache.block_size)
