"""Mixtral (Jiang et al., 2024, "Mixtral of Experts"): the Mistral decoder with experts in
every layer, the top-k of a softmax router always renormalised to sum to 1 (transformers'
``MixtralSparseMoeBlock``). Its checkpoints name the block ``block_sparse_moe`` and the
experts' projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down)."""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from .decoder import AttentionOptions
from .family import ModelFamily
from .fused_forward import FusedForward
from .mistral import read_config as capped_at_window
from .moe_decoder import MoEConfig, MoEDecoderModel, moe_config


class MixtralForCausalLM(MoEDecoderModel):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg, AttentionOptions())


def read_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """The expert fields (each expert has ``intermediate_size`` units), and the context capped
    at the sliding window as for Mistral."""
    return moe_config(
        capped_at_window(config, hf_config),
        range(config.num_layers),
        num_experts=hf_config.num_local_experts,
        top_k=hf_config.num_experts_per_tok,
        expert_intermediate_size=config.intermediate_size,
        renormalize=True,
    )


FAMILY = ModelFamily(
    "mixtral",
    ("MixtralForCausalLM",),
    "mixtral",
    MixtralForCausalLM,  # type: ignore[arg-type]
    read_config=read_config,
    fast_forward=FusedForward,
)
