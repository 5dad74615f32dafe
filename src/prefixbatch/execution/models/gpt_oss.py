"""gpt-oss (OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025; transformers'
``modeling_gpt_oss.py``): a mixture-of-experts decoder on the Llama-style blocks of
``decoder.py`` with

- attention sinks: a learned logit per query head that joins every softmax denominator and
  attends no value (``LayerAttention.sinks``, honoured by every attention backend);
- sliding-window layers (128 positions) alternating with global ones (``layer_types``);
- biases on q, k, v and o; YaRN rope scaling (``RopeConfig``);
- a router with a bias whose top-k logits are softmaxed among themselves
  (``routing.select_top_logits``), in every layer;
- experts with biases and a clamped SwiGLU (``layers.clamped_swiglu``: ``swiglu_alpha``,
  ``swiglu_limit``). The checkpoint stores the experts stacked as transformers computes them,
  ``gate_up_proj`` (E, H, 2I) with gate and up columns interleaved and ``down_proj`` (E, I, H),
  or MXFP4-quantised (``*_blocks``, ``*_scales``: ``moe/mxfp4.py``), dequantised at load; both
  are rearranged into the ``Experts`` layout (E, 2I, H) gate rows then up rows.

No CPU fast-path forward: the plain modules run (with the packed projections, the compiled
attention kernels and the CPU experts kernel). GGUF files of gpt-oss are not read (llama.cpp
stores its experts in its own MXFP4 tensor type, its sinks and biases under names of its own):
a clear error says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ...errors import UnsupportedModelError
from ..attention.backend import LayerAttention
from ..layers import clamped_swiglu
from ..moe.experts import Experts
from ..moe.mxfp4 import dequantize_mxfp4
from ..moe.routing import select_top_logits
from ..packed_linear import Linear
from .decoder import AttentionOptions, DecoderModel
from .family import ModelFamily

# shards of a stacked expert tensor stored MXFP4-quantised
BLOCKS, SCALES = 0, 1
_QUANTISED = {"_blocks": BLOCKS, "_scales": SCALES}


@dataclass(frozen=True, kw_only=True)
class GptOssConfig(ModelConfig):
    """gpt-oss's fields: ``layer_windows`` (per layer, its sliding window or None for a global
    layer), ``num_experts`` experts of ``intermediate_size`` units, ``top_k`` per token, and
    the clamped SwiGLU's ``swiglu_alpha`` and ``swiglu_limit``."""

    layer_windows: tuple[int | None, ...]
    num_experts: int
    top_k: int
    swiglu_alpha: float
    swiglu_limit: float


def read_config(config: ModelConfig, hf: Any) -> GptOssConfig:
    """gpt-oss's fields from its Hugging Face config; raises ``UnsupportedModelError`` for a
    layer type other than sliding or full attention."""
    types = hf.layer_types or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(config.num_layers)
    ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"gpt-oss layer types {sorted(unknown)}: not supported")
    window = hf.sliding_window
    return GptOssConfig(
        **vars(config),
        layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
        num_experts=hf.num_local_experts,
        top_k=hf.num_experts_per_tok,
        swiglu_alpha=float(hf.swiglu_alpha),
        swiglu_limit=float(hf.swiglu_limit),
    )


class GptOssExperts(Experts):
    """Biased experts with the clamped SwiGLU; loads the checkpoint's stacked tensors (plain or
    MXFP4) into the ``Experts`` layout."""

    def __init__(self, cfg: GptOssConfig) -> None:
        act = partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        super().__init__(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, act, bias=True)
        self.pending: dict[tuple[str, int], torch.Tensor] = {}  # MXFP4 halves seen so far

    def shards_of(self, param: str) -> set[int]:
        """A projection's MXFP4 halves (``BLOCKS``, ``SCALES``); a plain tensor loads whole."""
        return {BLOCKS, SCALES}

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        """A checkpoint tensor as transformers lays it out -> its parameter: ``gate_up_proj``
        (E, H, 2I) interleaved -> (E, 2I, H) gate rows then up rows, its bias (E, 2I) the
        same; ``down_proj`` (E, I, H) -> (E, H, I); ``down_proj_bias`` as it is. With ``shard``
        ``BLOCKS`` or ``SCALES``, one half of an MXFP4 projection (stored (E, out, G, 16) and
        (E, out, G)), dequantised once both are in. Raises ValueError when the shapes differ."""
        name = next(n for n, p in self.named_parameters() if p is param)
        if shard is not None:
            self.pending[name, shard] = tensor
            if (name, BLOCKS) not in self.pending or (name, SCALES) not in self.pending:
                return
            blocks, scales = self.pending.pop((name, BLOCKS)), self.pending.pop((name, SCALES))
            tensor = dequantize_mxfp4(blocks, scales).transpose(-1, -2)  # as transformers'
        if name in ("gate_up_proj", "down_proj"):
            tensor = tensor.transpose(-1, -2)  # (E, out, in)
        if name.startswith("gate_up_proj"):  # rows (or bias entries) gate, up, gate, up, ...
            tensor = torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
        if param.shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} where {tuple(param.shape)} is expected")
        param.data.copy_(tensor)


class GptOssMoeBlock(nn.Module):
    """``router`` (hidden -> E logits, with a bias) choosing ``top_k`` of the ``experts``.
    x (T, hidden) -> (T, hidden)."""

    def __init__(self, cfg: GptOssConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        self.experts = GptOssExperts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_top_logits(self.router(x), self.top_k)
        return self.experts(x, weights, ids)


def moe_block(cfg: ModelConfig, layer: int) -> nn.Module:
    assert isinstance(cfg, GptOssConfig)
    return GptOssMoeBlock(cfg)


class GptOssForCausalLM(DecoderModel):
    """The decoder with ``GptOssMoeBlock`` MLPs; each layer's attention has its window and its
    ``sinks`` (H,) parameter, handed to the backend with the window once loaded."""

    def __init__(self, cfg: GptOssConfig) -> None:
        bias = cfg.attention_bias
        super().__init__(cfg, AttentionOptions(qkv_bias=bias, o_bias=bias), moe_block)
        for layer, window in zip(self.layers, cfg.layer_windows):
            layer.self_attn.attn = LayerAttention(window)
            layer.self_attn.sinks = nn.Parameter(torch.empty(cfg.num_heads))

    def parameter_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        """MXFP4 halves (``experts.gate_up_proj_blocks``, ``..._scales``) load into their
        projection as the shards ``BLOCKS`` and ``SCALES``."""
        for suffix, shard in _QUANTISED.items():
            if ".experts." in checkpoint_name and checkpoint_name.endswith(suffix):
                return checkpoint_name.removeprefix("model.").removesuffix(suffix), shard
        return super().parameter_for(checkpoint_name)

    def shards_of(self, parameter: str) -> set[int | None]:
        owner = self.get_submodule(parameter.rpartition(".")[0])
        if isinstance(owner, GptOssExperts):
            return set(owner.shards_of(parameter))
        return super().shards_of(parameter)

    def finish_loading(self, loaded: set[str]) -> None:
        """As the Llama decoder's, and each layer's sinks (fp32) joined to its attention."""
        super().finish_loading(loaded)
        for layer in self.layers:
            attn = layer.self_attn
            attn.attn = replace(attn.attn, sinks=attn.sinks.detach().float())


FAMILY = ModelFamily(
    "gpt_oss",
    ("GptOssForCausalLM",),
    "gpt_oss",
    GptOssForCausalLM,  # type: ignore[arg-type]
    read_config=read_config,
    reads_gguf=False,
)
