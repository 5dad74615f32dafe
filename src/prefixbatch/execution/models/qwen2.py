"""Qwen2 and Qwen2.5 (Qwen team, 2024): the Llama decoder with biases on the q, k and v
projections (none on the output projection), as transformers' ``Qwen2Attention``."""

from __future__ import annotations

from ...config import ModelConfig
from .decoder import AttentionOptions, DecoderModel
from .family import ModelFamily
from .fused_forward import FusedForward


class Qwen2ForCausalLM(DecoderModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, AttentionOptions(qkv_bias=True))


FAMILY = ModelFamily(
    "qwen2", ("Qwen2ForCausalLM",), "qwen2", Qwen2ForCausalLM, fast_forward=FusedForward
)
