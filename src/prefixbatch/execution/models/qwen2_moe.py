"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen2 decoder (biases on q, k and v:
the config's ``qkv_bias``, on by default) with a softmax router over the experts (top-k
weights renormalised only where ``norm_topk_prob`` is set) and a shared expert every token
goes through, scaled by ``sigmoid(shared_expert_gate(x))``; dense layers where
``decoder_sparse_step`` / ``mlp_only_layers`` say (transformers' ``Qwen2MoeSparseMoeBlock``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...config import ModelConfig
from .decoder import AttentionOptions
from .family import ModelFamily
from .fused_forward import FusedForward
from .moe_decoder import MoEConfig, MoEDecoderModel, qwen_moe_config


class Qwen2MoeForCausalLM(MoEDecoderModel):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg, AttentionOptions(qkv_bias=cfg.attention_bias))


def read_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """The expert fields (``qwen_moe_config``) and the shared expert's size;
    ``attention_bias`` is the config's ``qkv_bias``."""
    config = replace(config, attention_bias=bool(getattr(hf_config, "qkv_bias", True)))
    shared = hf_config.shared_expert_intermediate_size
    return qwen_moe_config(config, hf_config, shared_expert_intermediate_size=shared)


FAMILY = ModelFamily(
    "qwen2_moe",
    ("Qwen2MoeForCausalLM",),
    "qwen2_moe",
    Qwen2MoeForCausalLM,  # type: ignore[arg-type]
    read_config=read_config,
    fast_forward=FusedForward,
)
