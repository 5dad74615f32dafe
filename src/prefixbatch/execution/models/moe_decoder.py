"""The mixture-of-experts decoder the Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE families share:
the Llama-style decoder (``decoder.py``) whose MLP is, in its sparse layers, a router choosing
``top_k`` of ``num_experts`` SwiGLU experts per token (``execution/moe``), with an optional
shared expert every token goes through, scaled by a sigmoid gate (Qwen2-MoE). Layers outside
``sparse_layers`` keep the dense MLP of ``intermediate_size`` (Qwen-MoE's
``decoder_sparse_step`` and ``mlp_only_layers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ..fused_ops import FusedKernels
from ..layers import GatedMLP
from ..moe.experts import Experts
from ..moe.routing import select_experts
from ..packed_linear import Linear
from .decoder import Attention, AttentionFactory, AttentionOptions, DecoderModel, MLPFactory
from .mistral import read_config as capped_at_window


@dataclass(frozen=True, kw_only=True)
class MoEConfig(ModelConfig):
    """The expert fields of a mixture-of-experts checkpoint: ``num_experts`` experts of
    ``expert_intermediate_size`` units, ``top_k`` per token, their weights renormalised to sum
    to 1 when ``renormalize``; a shared expert of ``shared_expert_intermediate_size`` units
    where it is not 0; experts in the layers ``sparse_layers``, the dense MLP elsewhere."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[int, ...]


def moe_config(config: ModelConfig, sparse_layers: Sequence[int], **fields: Any) -> MoEConfig:
    """``config`` with the expert fields (``MoEConfig``'s, by name) and its sparse layers."""
    return MoEConfig(**vars(config), sparse_layers=tuple(sparse_layers), **fields)


def qwen_moe_config(config: ModelConfig, hf_config: Any, **fields: Any) -> MoEConfig:
    """A Qwen-MoE config's expert fields (``num_experts``, ``num_experts_per_tok``,
    ``moe_intermediate_size``, ``norm_topk_prob``; more ``fields`` by name), experts in every
    ``decoder_sparse_step``-th layer except the ``mlp_only_layers`` (transformers' rule), and
    the context capped at a sliding window where one is used (as Mistral's)."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    sparse = [
        i
        for i in range(config.num_layers)
        if i not in dense and hf_config.num_experts > 0 and (i + 1) % step == 0
    ]
    return moe_config(
        capped_at_window(config, hf_config),
        sparse,
        num_experts=hf_config.num_experts,
        top_k=hf_config.num_experts_per_tok,
        expert_intermediate_size=hf_config.moe_intermediate_size,
        renormalize=bool(hf_config.norm_topk_prob),
        **fields,
    )


class SparseMoeBlock(nn.Module):
    """Router (``gate``: hidden -> E logits), ``experts``, and the optional ``shared_expert``
    with its ``shared_expert_gate`` (hidden -> 1). x (T, hidden) -> (T, hidden)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.top_k, self.renormalize = cfg.top_k, cfg.renormalize
        self.gate = Linear(hidden, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, hidden, cfg.expert_intermediate_size)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(hidden, shared) if shared else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x, self.shared_expert)

    def fused(self, kernels: FusedKernels) -> Callable[[torch.Tensor], torch.Tensor]:
        """This block on the CPU fast path: the shared expert in its fused form (the experts
        run the kernel the worker chose for them)."""
        shared = None if self.shared_expert is None else self.shared_expert.fused(kernels)
        return lambda x: self.moe(x, shared)

    def moe(
        self, x: torch.Tensor, shared: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        """x (T, hidden) -> the routed experts' weighted sum, plus sigmoid(shared_expert_gate
        (x)) * shared(x) where there is a shared expert (T, hidden)."""
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if shared is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared(x)
        return out


def moe_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The MLP of ``layer``: a ``SparseMoeBlock`` in the config's sparse layers, else dense."""
    assert isinstance(cfg, MoEConfig)
    if layer in cfg.sparse_layers:
        return SparseMoeBlock(cfg)
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size)


# A per-expert checkpoint tensor: experts.{e}.{projection}.weight (Mixtral: w1 gate, w3 up, w2
# down; the others: gate_proj, up_proj, down_proj).
_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
_PROJECTION = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_PROJECTION |= {"w1": "gate", "w3": "up", "w2": "down"}


class MoEDecoderModel(DecoderModel):
    """The decoder with ``moe_mlp`` layers (or the family's own ``mlp`` and ``attention``:
    DeepSeek's); it maps the checkpoints' expert tensors (one per expert and projection, or
    stacked) onto each layer's stacked ``Experts`` parameters, and Mixtral's
    ``block_sparse_moe`` onto ``mlp``."""

    packed_modules = {
        **DecoderModel.packed_modules,
        "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", 0),
        "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: MoEConfig,
        options: AttentionOptions,
        mlp: MLPFactory = moe_mlp,
        attention: AttentionFactory = Attention,
    ) -> None:
        super().__init__(cfg, options, mlp, attention)

    def parameter_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT_TENSOR.search(name)
        if match is None or match[2] not in _PROJECTION:
            return super().parameter_for(name)
        param, shard = Experts.shard(int(match[1]), _PROJECTION[match[2]])
        return f"{name[: match.start()].removeprefix('model.')}.experts.{param}", shard

    def shards_of(self, parameter: str) -> set[int | None]:
        owner, _, param = parameter.rpartition(".")
        module = self.get_submodule(owner) if owner else None
        if isinstance(module, Experts):
            return set(module.shards_of(param))
        return super().shards_of(parameter)
