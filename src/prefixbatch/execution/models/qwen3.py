"""Qwen3 dense models (Qwen3 technical report, 2025): the Llama decoder with an RMSNorm over
each head of q and k before rope; ``attention_bias`` puts biases on the q, k, v and output
projections, as transformers' ``Qwen3Attention``."""

from __future__ import annotations

from ...config import ModelConfig
from .decoder import AttentionOptions, DecoderModel
from .family import ModelFamily
from .fused_forward import FusedForward


class Qwen3ForCausalLM(DecoderModel):
    def __init__(self, cfg: ModelConfig) -> None:
        bias = cfg.attention_bias
        super().__init__(cfg, AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True))


FAMILY = ModelFamily(
    "qwen3", ("Qwen3ForCausalLM",), "qwen3", Qwen3ForCausalLM, fast_forward=FusedForward
)
