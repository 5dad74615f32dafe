"""OLMoE (Muennighoff et al., 2024, "OLMoE: Open Mixture-of-Experts Language Models"): a Llama
decoder whose q and k are RMS-normalised over all their heads at once (not per head), then
optionally clamped with v to ``[-clip_qkv, clip_qkv]``, with experts in every layer (top-k of a
softmax router, renormalised where ``norm_topk_prob`` is set; transformers'
``OlmoeSparseMoeBlock``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig
from .decoder import AttentionOptions
from .family import ModelFamily
from .fused_forward import FusedForward
from .moe_decoder import MoEConfig, MoEDecoderModel, moe_config


@dataclass(frozen=True, kw_only=True)
class OlmoeModelConfig(MoEConfig):
    """OLMoE's ``clip_qkv`` (None: no clamp)."""

    clip_qkv: float | None = None


class OlmoeForCausalLM(MoEDecoderModel):
    def __init__(self, cfg: OlmoeModelConfig) -> None:
        bias = cfg.attention_bias
        options = AttentionOptions(
            qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_all_heads=True, clip_qkv=cfg.clip_qkv
        )
        super().__init__(cfg, options)


def read_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """The expert fields (each expert has ``intermediate_size`` units) and ``clip_qkv``."""
    moe = moe_config(
        config,
        range(config.num_layers),
        num_experts=hf_config.num_experts,
        top_k=hf_config.num_experts_per_tok,
        expert_intermediate_size=config.intermediate_size,
        renormalize=bool(hf_config.norm_topk_prob),
    )
    clip = getattr(hf_config, "clip_qkv", None)
    return OlmoeModelConfig(**vars(moe), clip_qkv=None if clip is None else float(clip))


FAMILY = ModelFamily(
    "olmoe",
    ("OlmoeForCausalLM",),
    "olmoe",
    OlmoeForCausalLM,  # type: ignore[arg-type]
    read_config=read_config,
    fast_forward=FusedForward,
)
