"""Phi-3 and Phi-4-mini (Microsoft, 2024-2025; transformers' ``Phi3ForCausalLM``): the Llama
decoder without biases, whose checkpoints store q/k/v as one ``qkv_proj`` and gate/up as one
``gate_up_proj``, the same rows in the same order as the merged projections here, so they load
whole. What else differs is read into the common config: LongRoPE scaling and a partial rotary
factor (``RopeConfig``: Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini), tied embeddings (Phi-4-mini).

``sliding_window``: Phi-3-mini-4k and Phi-3-medium-4k set 2047 with 4096 positions; the context
is capped at the window, as Mistral's is, inside which sliding-window attention is full
attention. The 128k models set a window longer than their context, which changes nothing.
"""

from __future__ import annotations

from ...config import ModelConfig
from .decoder import AttentionOptions, DecoderModel
from .family import ModelFamily
from .fused_forward import FusedForward
from .mistral import read_config as cap_at_sliding_window


class Phi3ForCausalLM(DecoderModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, AttentionOptions())


FAMILY = ModelFamily(
    "phi3",
    ("Phi3ForCausalLM",),
    "phi3",
    Phi3ForCausalLM,
    read_config=cap_at_sliding_window,
    fast_forward=FusedForward,
)
