"""The Gemma decoder (Gemma Team, "Gemma 2: Improving Open Language Models at a Practical
Size", 2024), which the Gemma 2 and Gemma 3 families run (``gemma2.py``, ``gemma3.py``).

What differs from the Llama decoder (``decoder.py``), as transformers' ``modeling_gemma2.py``
and ``modeling_gemma3.py`` compute it:

- sliding-window layers interleaved with global ones (``layer_types``): a query at position p
  attends (p - sliding_window, p];
- attention logit soft-capping (Gemma 2's ``attn_logit_softcapping``) and final logit
  soft-capping (``final_logit_softcapping``): ``cap * tanh(x / cap)``;
- scores scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``;
- RMSNorm weights applied as ``1 + w`` (``GemmaRMSNorm``), with a norm before and after both
  the attention and the MLP (``pre_feedforward_layernorm``, ``post_feedforward_layernorm``);
- embeddings scaled by sqrt(hidden_size) (rounded to the weights' dtype, as transformers does);
- a GeGLU MLP (``gelu_pytorch_tanh``); tied embeddings;
- Gemma 3 only: per-head q/k norms and a rope of its own for sliding layers.

The attention backends apply each layer's window and soft-cap (``LayerAttention``); the KV cache
keeps every position of sliding layers too (only the window is read). The CPU fast path is
``gemma_fused_forward.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig, RopeConfig
from ...errors import UnsupportedModelError
from ..attention.backend import AttentionBackend, LayerAttention
from ..layers import GatedMLP, GemmaRMSNorm, RotaryEmbedding, gelu_tanh_and_mul, rope_inv_freq
from ..lm_head import LMHead
from .decoder import Attention, AttentionOptions, DecoderModel
from .family import CausalLM

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin (T, head_dim / 2)


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(ModelConfig):
    """The Gemma fields: ``layer_windows`` (per layer, its sliding window or None for a global
    layer), ``query_pre_attn_scalar``, the soft-caps (None: off), ``local_rope`` (Gemma 3: the
    rope of sliding layers; None: ``rope`` everywhere) and ``qk_norm`` (Gemma 3)."""

    layer_windows: tuple[int | None, ...]
    query_pre_attn_scalar: float
    attn_softcap: float | None
    final_softcap: float | None
    local_rope: RopeConfig | None = None
    qk_norm: bool = False

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def layer_attention(self, layer: int) -> LayerAttention:
        """What the attention backend applies in ``layer``: its window and the soft-cap."""
        return LayerAttention(self.layer_windows[layer], self.attn_softcap)


def gemma_fields(hf: Any, sliding_pattern: int) -> dict[str, Any]:
    """The Gemma fields common to Gemma 2 and 3 from a Hugging Face config (its text config):
    the layer windows from ``layer_types`` (transformers 5) or, in older configs, every
    ``sliding_pattern``-th layer global (Gemma 2: 2, Gemma 3: 6), and the query scalar. Raises
    ``UnsupportedModelError`` for an activation other than tanh-approximated GELU, a layer
    type other than sliding or full attention, or bidirectional attention (embedding models)."""
    activation = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma with activation {activation!r}: not supported")
    if getattr(hf, "use_bidirectional_attention", False):
        raise UnsupportedModelError("Gemma with bidirectional attention (an embedding model)")
    layers = hf.num_hidden_layers
    types = getattr(hf, "layer_types", None) or [
        "full_attention" if (i + 1) % sliding_pattern == 0 else "sliding_attention"
        for i in range(layers)
    ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"Gemma layer types {sorted(unknown)}: not supported")
    window = getattr(hf, "sliding_window", None)
    return {
        "layer_windows": tuple(window if t == "sliding_attention" else None for t in types),
        "query_pre_attn_scalar": float(hf.query_pre_attn_scalar),
    }


class GemmaDecoderLayer(nn.Module):
    """A pre- and post-norm layer: x + post_norm(attn(norm(x))), then the same around the MLP."""

    def __init__(self, cfg: GemmaConfig, layer: int, options: AttentionOptions) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sliding = cfg.layer_windows[layer] is not None
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = Attention(cfg, layer, options, cfg.layer_attention(layer))
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, gelu_tanh_and_mul)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        backend: AttentionBackend,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) as ``DecoderLayer`` carries them (the stream is x + residual; the
        embeddings and None at the first layer) -> this layer's (x, residual)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, rope, backend, meta))
        x, residual = self.pre_feedforward_layernorm.add_forward(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(CausalLM):
    """Token ids (T,) and positions (T,) -> logits (S, vocab) fp32 for the rows in
    ``logits_rows``, as ``DecoderModel`` (the same checkpoint names and merged projections)."""

    packed_modules = DecoderModel.packed_modules

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__(cfg)
        self.cfg: GemmaConfig = cfg
        bias = cfg.attention_bias
        options = AttentionOptions(bias, bias, qk_norm=cfg.qk_norm, norm=GemmaRMSNorm)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, options) for i in range(cfg.num_layers)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.local_rotary = RotaryEmbedding(cfg.local_rope or cfg.rope, cfg.head_dim)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        # sqrt(hidden) in the weights' dtype (0-d), set on the device by finish_loading
        self.register_buffer("embed_scale", torch.ones(()), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, hidden): the embeddings times sqrt(hidden)."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[Rope, Rope]:
        """(global layers' cos, sin; sliding layers' cos, sin) for positions (T,)."""
        rope = self.rotary.cos_sin(positions, dtype)
        if self.cfg.local_rope is None:  # Gemma 2: one rope for every layer
            return rope, rope
        return rope, self.local_rotary.cos_sin(positions, dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (S, hidden), normed -> fp32 logits (S, vocab), soft-capped."""
        logits = self.lm_head(x)
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def greedy_projection(self) -> nn.Linear | None:
        """The lm_head when the logits are not soft-capped (the capped ones can tie in fp32
        where the raw ones do not)."""
        return self.lm_head if self.cfg.final_softcap is None else None

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
        x = self.embed(input_ids)  # (T, hidden)
        ropes = self.ropes(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ropes[layer.sliding], backend, meta)
        assert residual is not None  # a model has layers
        x, _ = self.norm.add_forward(x[logits_rows], residual[logits_rows])
        return x.float() if hidden else self.logits(x)

    def finish_loading(self, loaded: set[str]) -> None:
        """Tie the output projection to the embeddings when the config says so or the
        checkpoint has no ``lm_head``; rebuild the derived buffers on the device: the rotary
        frequencies (fp32) and the embedding scale."""
        weight = self.embed_tokens.weight
        if self.cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
            self.lm_head.weight = weight
        cfg = self.cfg
        self.rotary.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(weight.device)
        local = rope_inv_freq(cfg.local_rope or cfg.rope, cfg.head_dim)
        self.local_rotary.inv_freq = local.to(weight.device)
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=weight.dtype).to(weight.device)
