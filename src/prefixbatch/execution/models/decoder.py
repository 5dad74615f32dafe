"""One decoder implementation for the Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm). Differences are flags on ``ModelConfig``, not separate classes.

Every forward works on a flattened batch: all scheduled tokens of all sequences concatenated,
no padding. Attention goes through an ``AttentionBackend`` that owns the paged KV cache layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ..attention.backend import AttentionBackend
from ..fused_ops import FusedKernels
from ..layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope
from ..packed_linear import Linear
from .fused_forward import FusedForward


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        """x (T, hidden), rope's cos, sin (T, head_dim/2) -> (T, hidden)."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.heads, self.head_dim)  # (T, H, D), strided views into the qkv output
        k = k.view(t, self.kv_heads, self.head_dim)  # (T, KVH, D)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = backend.forward(self.layer, q, k, v, meta)  # (T, H, D)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden), the previous layer's output (the embeddings at the first layer, whose
        residual is None), and the residual stream before it -> this layer's (output, residual).

        The residual stream is x + residual; carrying the two apart lets each add run fused with
        the norm that follows it (vLLM's layout)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, rope, backend, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Token ids (T,) and positions (T,) -> logits (S, vocab) fp32 for the rows in
    ``logits_rows``; ``meta`` is the attention backend's metadata for the step.

    The modules' forward is the plain PyTorch reference; with ``fused`` set (the CPU fast path,
    ``use_fused_kernels``) the model runs ``fused_forward.py`` instead."""

    fused: FusedForward | None = None

    # checkpoint sub-name -> (our parameter sub-name, shard index) for fused projections
    FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(input_ids, positions, backend, meta, logits_rows)
        x = self.embed_tokens(input_ids)  # (T, hidden)
        rope = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, backend, meta)
        assert residual is not None  # a model has layers
        # only rows that sample: (S, hidden)
        x, _ = self.norm.add_forward(x[logits_rows], residual[logits_rows])
        return self.lm_head(x).float()  # (S, vocab)

    def load_weights(self, weights) -> None:  # type: ignore[no-untyped-def]
        """Copy ``(checkpoint name, tensor)`` pairs in, fusing q/k/v and gate/up on the way."""
        params = dict(self.named_parameters())
        cfg = self.cfg
        qkv = [
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        ]
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            target, shard = name, None
            for sub, (fused, index) in self.FUSED.items():
                if f".{sub}." in name:
                    target, shard = name.replace(sub, fused), index
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            if shard is None:
                param.data.copy_(tensor)
            else:
                sizes = qkv if "qkv" in target else [cfg.intermediate_size] * 2
                start = sum(sizes[:shard])
                param.data[start : start + sizes[shard]].copy_(tensor)
            loaded.add(f"{target}:{shard}")
        if cfg.tie_word_embeddings or "lm_head.weight:None" not in loaded:
            self.lm_head.weight = self.embed_tokens.weight

    def use_fused_kernels(self, kernels: FusedKernels) -> None:
        """Run the CPU fast path (``fused_forward.py``) with ``kernels`` (CPU, fp32; after
        loading and packing the weights)."""
        self.fused = FusedForward(self, kernels)

    def pack_linears(self) -> None:
        """Switch every projection to oneDNN-packed weights (CPU, fp32; after loading)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
