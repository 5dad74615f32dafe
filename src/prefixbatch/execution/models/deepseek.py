"""DeepSeek-V2 (V2, V2-Lite, V2.5) and DeepSeek-V3 (V3, R1): multi-head latent attention over a
compressed KV cache (``mla.py``) and DeepSeekMoE (DeepSeek-AI, 2024, "DeepSeekMoE"; transformers'
``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py``):

- the first ``first_k_dense_replace`` layers keep the dense SwiGLU MLP; from there every
  ``moe_layer_freq``-th layer (DeepSeek's own code; 1 in every released checkpoint, and
  transformers reads no other) is a mixture of ``n_routed_experts`` experts of
  ``moe_intermediate_size`` units plus ``n_shared_experts`` shared ones that every token goes
  through, as one SwiGLU MLP of ``n_shared_experts * moe_intermediate_size`` units, unweighted;
- the router (``moe/grouped_routing.py``): V2's softmax scores, ``greedy`` or
  ``group_limited_greedy`` over ``n_group`` groups keeping ``topk_group``; V3's sigmoid scores
  with ``e_score_correction_bias`` for choosing, groups ranked by their two best; both weighted
  by ``routed_scaling_factor``, renormalised where ``norm_topk_prob`` is set (transformers'
  V2 router never renormalises; every released V2 checkpoint sets it false).

The experts run the kernel the worker chooses (``moe/kernel_choice.py``). No CPU fast-path
forward (its fused attention is grouped-query attention's): the plain modules run, with the
packed projections and the CPU experts kernel. V3's multi-token-prediction layers (numbered
from ``num_hidden_layers`` in the checkpoint) are not run and not loaded, as in transformers.
GGUF files of DeepSeek (llama.cpp's ``deepseek2``) are refused with a clear error: transformers'
GGUF reader maps no DeepSeek architecture; so are quantised checkpoints (V3's FP8 release).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ...errors import UnsupportedModelError
from ..layers import GatedMLP
from ..moe.experts import Experts
from ..moe.grouped_routing import GroupedRouting, select_grouped_experts
from .decoder import AttentionOptions
from .family import ModelFamily
from .mla import MLAConfig, MultiHeadLatentAttention, mla_fields
from .moe_decoder import MoEConfig, MoEDecoderModel, moe_config

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True, kw_only=True)
class DeepseekConfig(MoEConfig, MLAConfig):
    """MLA's fields, the experts' (``MoEConfig``: the shared experts as one of
    ``shared_expert_intermediate_size`` units) and the router's ``routing``."""

    routing: GroupedRouting


def read_config(config: ModelConfig, hf: Any) -> DeepseekConfig:
    """DeepSeek-V2's or V3's fields (the module docstring); raises ``UnsupportedModelError``
    for a V2 ``topk_method`` other than ``greedy`` or ``group_limited_greedy`` and for a
    quantised checkpoint (V3's released FP8 weights)."""
    quantised = getattr(hf, "quantization_config", None)
    if quantised:
        method = dict(quantised).get("quant_method", "?")
        raise UnsupportedModelError(
            f"a {method}-quantised DeepSeek checkpoint is not supported; use a bf16 conversion"
        )
    v3 = hf.model_type == "deepseek_v3"
    experts = hf.n_routed_experts or 0
    freq = getattr(hf, "moe_layer_freq", 1) or 1
    sparse = [
        i
        for i in range(config.num_layers)
        if experts and i >= hf.first_k_dense_replace and i % freq == 0
    ]
    method = getattr(hf, "topk_method", "greedy")
    if not v3 and method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"DeepSeek-V2 topk_method {method!r}: not supported")
    grouped = v3 or method == "group_limited_greedy"
    routing = GroupedRouting(
        top_k=hf.num_experts_per_tok,
        scoring="sigmoid" if v3 else "softmax",
        num_groups=(hf.n_group or 1) if grouped else 1,
        top_groups=(hf.topk_group or 1) if grouped else 1,
        group_score="top2" if v3 else "max",
        renormalize=bool(hf.norm_topk_prob),
        scaling=float(hf.routed_scaling_factor),
    )
    moe = moe_config(
        config,
        sparse,
        num_experts=experts,
        top_k=hf.num_experts_per_tok,
        expert_intermediate_size=hf.moe_intermediate_size,
        renormalize=routing.renormalize,
        shared_expert_intermediate_size=(hf.n_shared_experts or 0) * hf.moe_intermediate_size,
    )
    fields = {**vars(moe), **mla_fields(config, hf)}
    return DeepseekConfig(**fields, routing=routing)


class DeepseekRouter(nn.Module):
    """``weight`` (E, hidden) scores the experts in fp32; ``e_score_correction_bias`` (E,)
    only for V3 (sigmoid scoring). x (T, hidden) -> weights (T, top_k) fp32, ids (T, top_k).
    Its parameters stay fp32 whatever the model's dtype (transformers keeps the router in fp32:
    in bf16 a rounded correction bias would choose other experts)."""

    def _apply(self, fn: Any, recurse: bool = True) -> DeepseekRouter:
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            param.data = param.data.float()
        return self

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.routing = cfg.routing
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        sigmoid = cfg.routing.scoring == "sigmoid"
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(cfg.num_experts)) if sigmoid else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(x.float(), self.weight.float())
        return select_grouped_experts(logits, self.routing, self.e_score_correction_bias)


class DeepseekMoeBlock(nn.Module):
    """``gate`` (the router), the routed ``experts`` and the ``shared_experts``.
    x (T, hidden) -> (T, hidden)."""

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.gate = DeepseekRouter(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = GatedMLP(cfg.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)


def deepseek_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The MLP of ``layer``: DeepSeekMoE in the sparse layers, else the dense SwiGLU."""
    assert isinstance(cfg, DeepseekConfig)
    if layer in cfg.sparse_layers:
        return DeepseekMoeBlock(cfg)
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class DeepseekForCausalLM(MoEDecoderModel):
    """The decoder with MLA in every layer and ``deepseek_mlp`` MLPs (V2 and V3 alike: what
    differs is read into the config)."""

    packed_modules = {  # MLA's projections load as they are stored (no merged q/k/v)
        **{k: v for k, v in MoEDecoderModel.packed_modules.items() if "self_attn." not in k},
        "mlp.shared_experts.gate_proj": ("mlp.shared_experts.gate_up_proj", 0),
        "mlp.shared_experts.up_proj": ("mlp.shared_experts.gate_up_proj", 1),
    }

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__(cfg, AttentionOptions(), deepseek_mlp, MultiHeadLatentAttention)

    def parameter_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        """As the MoE decoder's; None for a layer past ``num_layers`` (V3's
        multi-token-prediction layers)."""
        layer = _LAYER.search(checkpoint_name)
        if layer is not None and int(layer[1]) >= self.cfg.num_layers:
            return None
        return super().parameter_for(checkpoint_name)


def _family(name: str, architecture: str) -> ModelFamily:
    return ModelFamily(
        name,
        (architecture,),
        name,
        DeepseekForCausalLM,  # type: ignore[arg-type]
        read_config=read_config,
        reads_gguf=False,
    )


V2_FAMILY = _family("deepseek_v2", "DeepseekV2ForCausalLM")
V3_FAMILY = _family("deepseek_v3", "DeepseekV3ForCausalLM")
