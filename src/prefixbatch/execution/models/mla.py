"""Multi-head latent attention (MLA; DeepSeek-AI, 2024, "DeepSeek-V2", section 2.1), run in its
absorbed form over a compressed KV cache.

Per token a layer projects the hidden state to a latent ``c_kv`` (``kv_lora_rank`` lanes,
RMS-normalised) and one shared rotary key ``k_pe`` (``qk_rope_head_dim`` lanes);
``kv_b_proj`` (H * (qk_nope_head_dim + v_head_dim), kv_lora_rank) expands the latent to every
head's non-rotary key ``k_nope = W_UK[h] c_kv`` and value ``v = W_UV[h] c_kv``. Queries come
from ``q_proj`` (V2-Lite) or the low-rank ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``,
split per head into ``q_nope`` and ``q_pe``; rope turns only ``q_pe`` and ``k_pe``.

The cache keeps only ``[c_kv, k_pe]`` per token (``KVLayout`` with the value in the key:
kv_lora_rank + qk_rope_head_dim lanes, against H * (qk_head_dim + v_head_dim) for the expanded
K and V). Attention runs on it directly, as DeepSeek's paper describes and vLLM's and SGLang's
MLA decode do: ``q_nope . k_nope = (W_UK[h]^T q_nope) . c_kv``, so each head's query is
absorbed into latent space, ``[W_UK[h]^T q_nope, q_pe]``, against one KV head whose key is
``[c_kv, k_pe]`` and whose value is ``c_kv`` (multi-query attention with a value narrower than
the key); each head's latent output then goes through ``W_UV[h]`` and ``o_proj``. Shared-prefix
attention reads a group's latent prefix once for all its members and all heads.

Rope: DeepSeek checkpoints lay each rotated pair out interleaved, ``(x0, x1), (x2, x3), ...``
(V2 always, V3 where ``rope_interleave``); those lanes are de-interleaved before the usual
rotate-half rope, the same permutation on queries and keys, so every score is unchanged. The
softmax scale is ``1 / sqrt(qk_head_dim)``, times YaRN's ``mscale(factor, mscale_all_dim)^2``
where the rope is scaled with ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import KVLayout, ModelConfig
from ..attention.backend import AttentionBackend
from ..layers import RMSNorm, apply_rope
from ..packed_linear import Linear
from .decoder import AttentionOptions

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm's default epsilon
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class MLAConfig(ModelConfig):
    """MLA's fields (the module docstring): ``q_lora_rank`` (None: one ``q_proj``),
    ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim`` (= ``head_dim``, what rope
    turns), ``v_head_dim``, ``rope_interleave`` and the ``softmax_scale``."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float

    @property
    def attention_scale(self) -> float:
        return self.softmax_scale

    @property
    def kv_layout(self) -> KVLayout:
        """One head of ``[c_kv, k_pe]``, its value ``c_kv`` kept in the key."""
        lanes = self.kv_lora_rank + self.qk_rope_head_dim
        return KVLayout(1, lanes, self.kv_lora_rank, value_in_key=True)


def mla_fields(config: ModelConfig, hf: Any) -> dict[str, Any]:
    """MLA's fields of a DeepSeek-V2/V3 Hugging Face config, by ``MLAConfig``'s names (and
    ``head_dim``, set to the rotary part)."""
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    params = {**dict(getattr(hf, "rope_scaling", None) or {}), **dict(hf.rope_parameters or {})}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    mscale_all_dim = params.get("mscale_all_dim") or 0
    scale = qk_head_dim**-0.5
    if rope_type != "default" and mscale_all_dim and config.rope.factor > 1:
        scale *= (0.1 * mscale_all_dim * math.log(config.rope.factor) + 1.0) ** 2
    return {
        "head_dim": hf.qk_rope_head_dim,
        "q_lora_rank": hf.q_lora_rank,
        "kv_lora_rank": hf.kv_lora_rank,
        "qk_nope_head_dim": hf.qk_nope_head_dim,
        "qk_rope_head_dim": hf.qk_rope_head_dim,
        "v_head_dim": hf.v_head_dim,
        "rope_interleave": bool(getattr(hf, "rope_interleave", True)),
        "softmax_scale": scale,
    }


class LatentUpProjection(nn.Module):
    """``kv_b_proj``: its ``weight`` (H * (nope + v), rank) holds per head ``W_UK[h]``
    (nope, rank) then ``W_UV[h]`` (v, rank); never used to expand the cache, only absorbed."""

    def __init__(self, heads: int, rank: int, nope: int, v: int) -> None:
        super().__init__()
        self.heads, self.nope = heads, nope
        self.weight = nn.Parameter(torch.empty(heads * (nope + v), rank))

    def per_head(self) -> torch.Tensor:
        """(H, nope + v, rank) view of the weight."""
        return self.weight.view(self.heads, -1, self.weight.shape[1])

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (T, H, nope) -> the query in latent space, W_UK[h]^T q_nope (T, H, rank)."""
        w_uk = self.per_head()[:, : self.nope]  # (H, nope, rank)
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def values(self, latent: torch.Tensor) -> torch.Tensor:
        """Each head's attention output in latent space (T, H, rank) -> W_UV[h] out (T, H, v)."""
        w_uv = self.per_head()[:, self.nope :]  # (H, v, rank)
        return torch.bmm(latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2n) with rotated pairs interleaved -> the pairs' first lanes, then their second."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """MLA of layer ``layer`` (the module docstring); the ``AttentionFactory`` signature
    (``options`` unused: MLA has no GQA options)."""

    def __init__(self, cfg: ModelConfig, layer: int, options: AttentionOptions) -> None:
        super().__init__()
        assert isinstance(cfg, MLAConfig)
        self.layer = layer
        self.heads, hidden, bias = cfg.num_heads, cfg.hidden_size, cfg.attention_bias
        self.nope, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.rank, self.v_dim = cfg.kv_lora_rank, cfg.v_head_dim
        self.interleaved = cfg.rope_interleave
        q_out = self.heads * (self.nope + self.rope_dim)
        rank = cfg.q_lora_rank
        self.q_proj = Linear(hidden, q_out, bias=False) if rank is None else None
        self.q_a_proj = Linear(hidden, rank, bias=bias) if rank is not None else None
        self.q_a_layernorm = RMSNorm(rank, LATENT_NORM_EPS) if rank is not None else None
        self.q_b_proj = Linear(rank, q_out, bias=False) if rank is not None else None
        self.kv_a_proj_with_mqa = Linear(hidden, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(self.heads, self.rank, self.nope, self.v_dim)
        self.o_proj = Linear(self.heads * self.v_dim, hidden, bias=bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> q (T, H, qk_head_dim)."""
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj and self.q_a_layernorm and self.q_b_proj
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.heads, -1)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotary lanes x (T, heads, rope_dim) turned, de-interleaved first if stored so."""
        return apply_rope(deinterleave(x) if self.interleaved else x, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        """x (T, hidden), rope's cos, sin (T, qk_rope_head_dim / 2) -> (T, hidden)."""
        t = x.shape[0]
        q_nope, q_pe = self.query(x).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        key = torch.cat(  # (T, 1, rank + rope_dim): what the cache keeps
            (self.kv_a_layernorm(c_kv)[:, None], self.rope(k_pe[:, None], *rope)), dim=-1
        )
        query = torch.cat((self.kv_b_proj.absorb_query(q_nope), self.rope(q_pe, *rope)), dim=-1)
        latent = backend.forward(self.layer, query, key, key[..., : self.rank], meta)
        out = self.kv_b_proj.values(latent)  # (T, H, v_head_dim)
        return self.o_proj(out.reshape(t, self.heads * self.v_dim))
