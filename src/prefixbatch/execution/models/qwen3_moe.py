"""Qwen3-MoE (Qwen3 technical report, 2025; Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3
decoder (per-head q/k RMSNorm, ``attention_bias`` on q, k, v and o) with experts chosen by a
softmax router, the top-k weights renormalised where ``norm_topk_prob`` is set, and dense
layers where ``decoder_sparse_step`` / ``mlp_only_layers`` say (transformers'
``Qwen3MoeSparseMoeBlock``)."""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from .decoder import AttentionOptions
from .family import ModelFamily
from .fused_forward import FusedForward
from .moe_decoder import MoEConfig, MoEDecoderModel, qwen_moe_config


class Qwen3MoeForCausalLM(MoEDecoderModel):
    def __init__(self, cfg: MoEConfig) -> None:
        bias = cfg.attention_bias
        super().__init__(cfg, AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True))


def read_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """The expert fields (``qwen_moe_config``)."""
    return qwen_moe_config(config, hf_config)


FAMILY = ModelFamily(
    "qwen3_moe",
    ("Qwen3MoeForCausalLM",),
    "qwen3_moe",
    Qwen3MoeForCausalLM,  # type: ignore[arg-type]
    read_config=read_config,
    fast_forward=FusedForward,
)
