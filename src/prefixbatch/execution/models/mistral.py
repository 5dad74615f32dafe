"""Mistral 7B (Jiang et al., 2023): the Llama decoder with sliding-window attention. Inside the
window sliding-window attention equals full attention, so the engine caps the context at the
window and runs the Llama model."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...config import ModelConfig
from .family import ModelFamily
from .fused_forward import FusedForward
from .llama import LlamaForCausalLM


def read_config(config: ModelConfig, hf_config: Any) -> ModelConfig:
    """The context capped at ``sliding_window`` (when the checkpoint sets one)."""
    window = getattr(hf_config, "sliding_window", None)
    return replace(config, max_position=min(config.max_position, window)) if window else config


FAMILY = ModelFamily(
    "mistral",
    ("MistralForCausalLM",),
    "mistral",
    LlamaForCausalLM,
    read_config=read_config,
    fast_forward=FusedForward,
)
