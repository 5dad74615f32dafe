"""The Llama-style decoder the Llama, Mistral, Qwen2 and Qwen3 families share: pre-norm layers
of grouped-query attention with rotary embeddings and a SwiGLU MLP. What differs between them
(biases, q/k norms, clipping) is ``AttentionOptions``, set by each family's file; a family may
put another MLP in some layers (the mixture-of-experts families, ``moe_decoder.py``) or another
attention in every layer (DeepSeek's multi-head latent attention, ``mla.py``).

Every forward works on a flattened batch: all scheduled tokens of all sequences concatenated,
no padding. Attention goes through an ``AttentionBackend`` that owns the paged KV cache layout.
The modules' forward is the plain PyTorch reference; the CPU fast path (``fused_forward.py``)
runs the same weights through the fused kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ..attention.backend import FULL_ATTENTION, AttentionBackend, LayerAttention
from ..layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq
from ..lm_head import LMHead
from ..packed_linear import Linear, MergedLinear
from .family import CausalLM


@dataclass(frozen=True)
class AttentionOptions:
    """``qkv_bias``: biases on the q, k and v projections; ``o_bias``: on the output projection;
    ``qk_norm``: an RMSNorm over each head of q and k before rope (Qwen3, Gemma 3), or with
    ``qk_norm_all_heads`` over all heads of q (and of k) at once (OLMoE), of class ``norm``
    (``GemmaRMSNorm`` for Gemma); ``clip_qkv``: q, k and v clamped to
    ``[-clip_qkv, clip_qkv]`` after the norms (OLMoE's ``clip_qkv``)."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    qk_norm_all_heads: bool = False
    clip_qkv: float | None = None
    norm: type[RMSNorm] = RMSNorm


class Attention(nn.Module):
    """Grouped-query attention of layer ``layer``; ``attn`` is what the backend adds to causal
    attention for this layer (its sliding window and soft-cap)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        options: AttentionOptions,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.attn = attn
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        sizes = (self.q_size, self.kv_size, self.kv_size)
        self.qkv_proj = MergedLinear(cfg.hidden_size, sizes, bias=options.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=options.o_bias)
        whole = options.qk_norm_all_heads
        q_dim, k_dim = (self.q_size, self.kv_size) if whole else (self.head_dim, self.head_dim)
        norm = options.norm if options.qk_norm else None
        self.q_norm = norm(q_dim, cfg.rms_norm_eps) if norm else None
        self.k_norm = norm(k_dim, cfg.rms_norm_eps) if norm else None
        self.clip_qkv = options.clip_qkv

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
        if self.q_norm is not None and self.k_norm is not None:
            # (T, H, D) per head, or (T, 1, H * D) over all heads: strided views into qkv
            q = self.q_norm(q.view(t, -1, self.q_norm.weight.shape[0]))
            k = self.k_norm(k.view(t, -1, self.k_norm.weight.shape[0]))
        if self.clip_qkv is not None:
            q, k, v = (y.clamp(-self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        q = q.reshape(t, self.heads, self.head_dim)  # (T, H, D), views where q was one
        k = k.reshape(t, self.kv_heads, self.head_dim)  # (T, KVH, D)
        v = v.reshape(t, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = backend.forward(self.layer, q, k, v, meta, self.attn)  # (T, H, D)
        return self.o_proj(out.reshape(t, self.q_size))


# (config, layer index) -> the layer's MLP: a module of x (T, hidden) -> (T, hidden) that also
# has ``fused(kernels)``, its CPU fast path form (``GatedMLP``, ``SparseMoeBlock``).
MLPFactory = Callable[[ModelConfig, int], nn.Module]
# (config, layer index, options) -> the layer's attention: a module of (x (T, hidden), rope's
# cos and sin, backend, meta) -> (T, hidden) (``Attention``, ``MultiHeadLatentAttention``).
AttentionFactory = Callable[[ModelConfig, int, AttentionOptions], nn.Module]


def dense_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The SwiGLU MLP of ``intermediate_size`` in every layer."""
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        options: AttentionOptions,
        mlp: MLPFactory,
        attention: AttentionFactory = Attention,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention(cfg, layer, options)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp(cfg, layer)

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


class DecoderModel(CausalLM):
    """Token ids (T,) and positions (T,) -> logits (S, vocab) fp32 for the rows in
    ``logits_rows``; ``meta`` is the attention backend's metadata for the step."""

    # Checkpoints store q/k/v and gate/up apart; the model computes each group as one matmul.
    packed_modules = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        options: AttentionOptions,
        mlp: MLPFactory = dense_mlp,
        attention: AttentionFactory = Attention,
    ) -> None:
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = (DecoderLayer(cfg, i, options, mlp, attention) for i in range(cfg.num_layers))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
        logits_rows: torch.Tensor,
        hidden: bool = False,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        rope = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, backend, meta)
        assert residual is not None  # a model has layers
        # only rows that sample: (S, hidden)
        x, _ = self.norm.add_forward(x[logits_rows], residual[logits_rows])
        return x.float() if hidden else self.logits(x)  # (S, hidden) or (S, vocab)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (S, hidden), normed -> fp32 logits (S, vocab)."""
        return self.lm_head(x).float()

    def greedy_projection(self) -> nn.Linear | None:
        return self.lm_head

    def finish_loading(self, loaded: set[str]) -> None:
        """Tie the output projection to the embeddings when the config says so or the
        checkpoint has no ``lm_head``; rebuild the fp32 rotary frequencies on the device (a
        buffer, not in the checkpoint)."""
        if self.cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
            self.lm_head.weight = self.embed_tokens.weight
        device = self.embed_tokens.weight.device
        self.rotary.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim).to(device)
