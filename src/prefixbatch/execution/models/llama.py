"""Llama 2 and Llama 3 (Touvron et al., 2023; Meta's Llama 3 with its "llama3" rope scaling,
read into ``RopeConfig``): the shared decoder as it is. ``attention_bias`` puts biases on the q,
k, v and output projections, as transformers' ``LlamaAttention`` does."""

from __future__ import annotations

from ...config import ModelConfig
from .decoder import AttentionOptions, DecoderModel
from .family import ModelFamily
from .fused_forward import FusedForward


class LlamaForCausalLM(DecoderModel):
    def __init__(self, cfg: ModelConfig) -> None:
        bias = cfg.attention_bias
        super().__init__(cfg, AttentionOptions(qkv_bias=bias, o_bias=bias))


FAMILY = ModelFamily(
    "llama", ("LlamaForCausalLM",), "llama", LlamaForCausalLM, fast_forward=FusedForward
)
