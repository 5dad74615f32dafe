"""The CPU fast path's forward: a ``DecoderModel``'s layers as one flat loop over their weights,
through the fused element-wise kernels (``fused_ops.py``) and the packed projections. The worker
runs it in place of the model's forward for the families that register it (``fast_forward``).

The modules' own forward (``decoder.py``, ``layers.py``) is the plain PyTorch reference and what
the GPU runs. On the CPU a decode step is about a dozen small calls per layer, and the module
structure around them (``nn.Module.__call__``, attribute lookups, wrapper methods) took 2.5 ms
of a 113 ms decode step of SmolLM2 at 64 rows. This loop reads each layer's tensors from a record
built once and calls the kernels directly. It computes what the reference computes, op for op,
in the same order (tested against it, and the engine against transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention.backend import AttentionBackend, LayerAttention
from ..fused_ops import FusedKernels
from ..layers import rotary_dim
from ..packed_linear import Projection
from .decoder import DecoderModel


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the loop reads it (norm weights as the kernels take them:
    ``RMSNorm.kernel_weight``)."""

    index: int  # the layer's index in the KV cache
    attn: LayerAttention  # the layer's sliding window and soft-cap
    input_norm: torch.Tensor  # (hidden,)
    qkv: Projection  # hidden -> (H + 2 KVH) * D
    # RMSNorm weights of q and k: (D,) per head (Qwen3), (H * D,) over all heads (OLMoE), or None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    clip_qkv: float | None  # q, k, v clamped to [-clip, clip] after the norms (OLMoE)
    o: Projection  # H * D -> hidden
    post_norm: torch.Tensor  # (hidden,)
    mlp: Callable[[torch.Tensor], torch.Tensor]  # (T, hidden) -> (T, hidden), in its fused form


class FusedForward:
    """``DecoderModel.forward`` for fp32 on the CPU with ``kernels``. Built after the weights are
    loaded (and packed): it keeps references to them. Each layer's MLP runs in the form its
    module gives for the fast path (``fused(kernels)``: dense or mixture-of-experts)."""

    def __init__(self, model: DecoderModel, kernels: FusedKernels) -> None:
        self.model = model
        self.kernels = kernels
        first = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = first.heads, first.kv_heads, first.head_dim
        self.qkv_sizes = [first.q_size, first.kv_size, first.kv_size]
        # partial rotary (Phi-4-mini): the kernel rotates views of each head's first dimensions
        rotary = rotary_dim(model.cfg.rope, self.head_dim)
        self.rotary_dim = rotary if rotary < self.head_dim else None
        self.eps = model.cfg.rms_norm_eps
        self.layers = tuple(self._weights(layer) for layer in model.layers)
        self.final_norm = model.norm.kernel_weight()

    def _weights(self, layer: nn.Module) -> LayerWeights:
        attn = layer.self_attn
        return LayerWeights(
            attn.layer,
            attn.attn,
            layer.input_layernorm.kernel_weight(),
            attn.qkv_proj.projection(),
            None if attn.q_norm is None else attn.q_norm.kernel_weight(),
            None if attn.k_norm is None else attn.k_norm.kernel_weight(),
            attn.clip_qkv,
            attn.o_proj.projection(),
            layer.post_attention_layernorm.kernel_weight(),
            layer.mlp.fused(self.kernels),
        )

    def attention(
        self,
        w: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        """A layer's attention block: x (T, hidden), normed -> the output projection's
        (T, hidden), as ``decoder.Attention`` computes it."""
        kernels, eps = self.kernels, self.eps
        t, heads, kv_heads, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        linear, weight, bias = w.qkv
        qkv = linear(x, weight, bias)
        q, k, v = qkv.split_with_sizes(self.qkv_sizes, dim=-1)
        if w.q_norm is not None and w.k_norm is not None:  # (T, H, D) or (T, 1, H * D) views
            kernels.rms_norm_(q.view(t, -1, w.q_norm.shape[0]), w.q_norm, eps)
            kernels.rms_norm_(k.view(t, -1, w.k_norm.shape[0]), w.k_norm, eps)
        if w.clip_qkv is not None:
            qkv.clamp_(-w.clip_qkv, w.clip_qkv)
        q = q.view(t, heads, dim)  # strided views into the qkv output
        k = k.view(t, kv_heads, dim)
        v = v.view(t, kv_heads, dim)
        if self.rotary_dim is None:
            kernels.rotary_embedding_(q, k, cos, sin)
        else:
            rot = self.rotary_dim
            kernels.rotary_embedding_(q[..., :rot], k[..., :rot], cos, sin)
        out = backend.forward(w.index, q, k, v, meta, w.attn)  # (T, H, D)
        linear, weight, bias = w.o
        return linear(out.reshape(t, heads * dim), weight, bias)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
        logits_rows: torch.Tensor,
        hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions (T,), T >= 1 -> logits (S, vocab) of the rows ``logits_rows``
        (``hidden``: their final-norm hidden states (S, hidden))."""
        model, kernels, eps = self.model, self.kernels, self.eps
        residual = model.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = model.rotary.cos_sin(positions, residual.dtype)
        x = kernels.rms_norm(residual, self.layers[0].input_norm, eps)
        for i, w in enumerate(self.layers):
            if i:  # the residual stream is x + residual (see DecoderLayer)
                kernels.fused_add_rms_norm_(x, residual, w.input_norm, eps)
            x = self.attention(w, x, cos, sin, backend, meta)
            kernels.fused_add_rms_norm_(x, residual, w.post_norm, eps)
            x = w.mlp(x)
        x, residual = x[logits_rows], residual[logits_rows]  # only rows that sample: (S, hidden)
        kernels.fused_add_rms_norm_(x, residual, self.final_norm, eps)
        return x if hidden else model.logits(x)  # (S, hidden) or (S, vocab)
