"""What a model family is to the engine: a model class the worker can build, load and run, and
the names of the checkpoints it reads.

A family is one file under ``execution/models/`` that defines its model (a ``CausalLM``, usually
on the shared blocks of ``decoder.py``) and a ``ModelFamily`` record, listed in
``registry.FAMILIES``. Its config-specific fields (sliding windows, soft-capping, expert routing,
rope and norm variants) are read by its ``read_config``, which may return a subclass of
``ModelConfig`` with fields of its own (``@dataclass(frozen=True, kw_only=True)``, built as
``Subclass(**vars(config), extra=...)``); the model reads them from the config it is built with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ...config import ModelConfig
from ..attention.backend import AttentionBackend
from ..fused_ops import FusedKernels


class Forward(Protocol):
    """A model's forward, or its CPU fast path: input_ids (T,), positions (T,), the backend and
    its step metadata, logits_rows (S,) -> fp32 logits (S, vocab) of the rows ``logits_rows``;
    with ``hidden`` the final-norm hidden states of those rows instead, (S, hidden) fp32 (what
    embedding models pool: transformers' ``last_hidden_state``)."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
        logits_rows: torch.Tensor,
        hidden: bool = False,
    ) -> torch.Tensor: ...


class CausalLM(nn.Module):
    """A decoder the worker builds on the meta device, allocates on its device in its dtype, and
    loads a checkpoint into (``loader.py``). Its ``forward`` has the ``Forward`` signature over
    a flattened batch (every scheduled token of every sequence, no padding) and reaches the
    KV cache only through the attention backend.

    Checkpoint names map to parameters by ``parameter_for``; a parameter is loaded by the
    ``weight_loader`` of the module that owns it (a plain copy where it has none).

    A sequence classifier's checkpoint (``ModelConfig.num_labels``) adds its ``score`` head,
    (num_labels, hidden) without bias as transformers' ``*ForSequenceClassification`` has it;
    the engine applies it to the hidden states the forward returns (``execution/score_head.py``).
    """

    # checkpoint sub-module name -> (our merged sub-module, shard index), e.g. q_proj -> qkv_proj
    packed_modules: ClassVar[Mapping[str, tuple[str, int]]] = {}
    # checkpoint tensors that are not parameters here (buffers the model derives itself)
    derived: ClassVar[tuple[str, ...]] = ("rotary_emb.",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.score: nn.Linear | None = None  # (num_labels, hidden): a classifier's head
        if cfg.num_labels:
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (S, hidden) in the model's dtype -> fp32 logits (S, vocab),
        as the forward computes them (the family's output projection and any soft-capping)."""
        raise NotImplementedError

    def greedy_projection(self) -> nn.Linear | None:
        """The output projection whose output, as fp32, is exactly ``logits`` (nothing applied
        after it): a greedy step may then take each row's largest ``x @ weight.T`` without
        materialising the logits (``fused_ops.lm_head_argmax``). None (the default) when the
        family soft-caps or scales its logits."""
        return None

    def parameter_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        """The parameter a checkpoint tensor loads into and the shard it fills there (None:
        all of it), or None for a tensor the model derives itself. Hugging Face checkpoints
        keep the decoder under ``model.``; the model keeps it at its top level."""
        name = checkpoint_name.removeprefix("model.")
        if any(part in name for part in self.derived):
            return None
        for sub, (merged, shard) in self.packed_modules.items():
            if f".{sub}." in name:
                return name.replace(f".{sub}.", f".{merged}."), shard
        return name, None

    def shards_of(self, parameter: str) -> set[int | None]:
        """The shards a parameter is loaded in: those of its merged module, else {None}."""
        shards: set[int | None] = {
            s for merged, s in self.packed_modules.values() if f".{merged}." in parameter
        }
        return shards or {None}

    def finish_loading(self, loaded: set[str]) -> None:
        """Called once every checkpoint tensor is in (``loaded``: the parameters it filled):
        tie weights the checkpoint leaves out, rebuild buffers on the device. Nothing here."""


def keep_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """A family without fields of its own: the common config as read."""
    return config


@dataclass(frozen=True)
class ModelFamily:
    """One family: ``name`` (``ModelConfig.architecture``), the Hugging Face ``architectures``
    entries it reads, its ``model_type`` (what transformers reads a GGUF file's config as),
    the model class, ``read_config`` (the common config and the Hugging Face config -> the
    family's config) and, optionally, the CPU fast path's forward (``fused_forward.py``),
    built from the loaded model and the fused kernels. ``reads_gguf``: whether its GGUF files
    are read (False: refused with a clear error)."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    model: Callable[[ModelConfig], CausalLM]
    read_config: Callable[[ModelConfig, Any], ModelConfig] = keep_config
    fast_forward: Callable[[Any, FusedKernels], Forward] | None = None
    reads_gguf: bool = True
