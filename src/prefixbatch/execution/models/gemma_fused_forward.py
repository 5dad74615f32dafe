"""The CPU fast path of the Gemma decoder (``gemma.py``): ``FusedForward``'s
attention and MLP blocks in Gemma's layer, through the fused kernels.

Per layer: the input norm fused with the residual add, the attention block (q/k norms, rope of
the layer's kind, the backend with the layer's window and soft-cap), the post-attention norm in
place, the pre-MLP norm fused with the residual add, the GeGLU MLP (``gelu_tanh_and_mul``), the
post-MLP norm in place. The (1 + w) norm weights are computed once, in fp32
(``GemmaRMSNorm.kernel_weight``). It computes what ``GemmaModel.forward`` computes, op for op
(tested against it, and the engine against transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention.backend import AttentionBackend
from ..fused_ops import FusedKernels
from .fused_forward import FusedForward, LayerWeights
from .gemma import GemmaModel


@dataclass(frozen=True)
class GemmaLayerWeights(LayerWeights):
    """A Gemma layer: ``post_norm`` is the post-attention norm; the MLP has its own two."""

    pre_mlp_norm: torch.Tensor  # (hidden,)
    post_mlp_norm: torch.Tensor  # (hidden,)
    sliding: bool  # reads the sliding layers' rope


class GemmaFusedForward(FusedForward):
    """``GemmaModel.forward`` for fp32 on the CPU with ``kernels``."""

    layers: tuple[GemmaLayerWeights, ...]

    def __init__(self, model: GemmaModel, kernels: FusedKernels) -> None:
        super().__init__(model, kernels)  # type: ignore[arg-type]
        self.gemma = model

    def _weights(self, layer: nn.Module) -> GemmaLayerWeights:
        common = vars(super()._weights(layer))
        return GemmaLayerWeights(
            **common,
            pre_mlp_norm=layer.pre_feedforward_layernorm.kernel_weight(),
            post_mlp_norm=layer.post_feedforward_layernorm.kernel_weight(),
            sliding=layer.sliding,
        )

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
        model, kernels, eps = self.gemma, self.kernels, self.eps
        residual = model.embed(input_ids)  # (T, hidden)
        ropes = model.ropes(positions, residual.dtype)
        x = kernels.rms_norm(residual, self.layers[0].input_norm, eps)
        for i, w in enumerate(self.layers):
            if i:  # the residual stream is x + residual (see GemmaDecoderLayer)
                kernels.fused_add_rms_norm_(x, residual, w.input_norm, eps)
            x = self.attention(w, x, *ropes[w.sliding], backend, meta)
            kernels.rms_norm_(x, w.post_norm, eps)
            kernels.fused_add_rms_norm_(x, residual, w.pre_mlp_norm, eps)
            x = w.mlp(x)
            kernels.rms_norm_(x, w.post_mlp_norm, eps)
        x, residual = x[logits_rows], residual[logits_rows]  # only rows that sample: (S, hidden)
        kernels.fused_add_rms_norm_(x, residual, self.final_norm, eps)
        return x if hidden else model.logits(x)  # (S, hidden) or (S, vocab)
