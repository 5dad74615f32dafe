"""Gemma 2 (Gemma Team, 2024): the Gemma decoder (``gemma.py``) with sliding and global layers
alternating (the first sliding), attention logits soft-capped at ``attn_logit_softcapping``
(50) and final logits at ``final_logit_softcapping`` (30). Runs the CPU fast path
(``gemma_fused_forward.py``)."""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig
from .family import ModelFamily
from .gemma import GemmaConfig, GemmaModel, gemma_fields
from .gemma_fused_forward import GemmaFusedForward


def read_config(config: ModelConfig, hf: Any) -> GemmaConfig:
    """Gemma 2's fields (its soft-caps are on by default)."""
    return GemmaConfig(
        **vars(config),
        **gemma_fields(hf, sliding_pattern=2),
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None),
    )


FAMILY = ModelFamily(
    "gemma2",
    ("Gemma2ForCausalLM",),
    "gemma2",
    GemmaModel,
    read_config=read_config,
    fast_forward=GemmaFusedForward,
)
