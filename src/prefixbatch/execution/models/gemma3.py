"""Gemma 3, text (Gemma Team, "Gemma 3 Technical Report", 2025): the Gemma decoder
(``gemma.py``) with five sliding layers to each global one (``layer_types``), an RMSNorm over
each head of q and k before rope, and a rope of its own for sliding layers
(``rope_local_base_freq``, 10,000) while global layers keep ``rope_theta`` (1,000,000) and the
checkpoint's rope scaling (``linear``, factor 8, on the larger models). As in transformers'
``Gemma3Attention``, attention logits are not soft-capped (``attn_logit_softcapping`` is read
by no Gemma 3 layer); final logits are when ``final_logit_softcapping`` is set.

``Gemma3ForConditionalGeneration`` checkpoints (the 4B, 12B and 27B, text and images) run as
text models: their ``text_config`` is read, the language model's tensors loaded (under
``model.language_model.`` or, as older checkpoints write them, ``language_model.model.``) and
the vision tower's and projector's skipped. As transformers' model of that name, they apply no
final soft-cap. Runs the CPU fast path (``gemma_fused_forward.py``).
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig, RopeConfig
from ...errors import UnsupportedModelError
from .family import ModelFamily
from .gemma import GemmaConfig, GemmaModel, gemma_fields
from .gemma_fused_forward import GemmaFusedForward

MULTIMODAL = "Gemma3ForConditionalGeneration"
# checkpoint name prefix of the language model -> as the text model names it
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.")
_VISION_PREFIXES += ("multi_modal_projector.",)


def rope_of(params: dict[str, Any], theta: float) -> RopeConfig:
    """One layer type's rope parameters (``rope_theta``, else ``theta``; ``rope_type`` or
    ``type``): none or ``linear`` scaling, the two Gemma 3 uses. Raises
    ``UnsupportedModelError`` for another."""
    theta = float(params.get("rope_theta", theta))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta)
    if rope_type == "linear":
        return RopeConfig(theta, "linear", factor=float(params["factor"]))
    raise UnsupportedModelError(f"Gemma 3 with rope scaling {rope_type!r}: not supported")


def ropes(text: Any) -> tuple[RopeConfig, RopeConfig]:
    """(global layers' rope, sliding layers' rope) of a Gemma 3 text config: transformers 5
    keeps one parameter dict per layer type in ``rope_parameters``; 4.x has ``rope_theta`` and
    ``rope_scaling`` (global) and ``rope_local_base_freq``."""
    params = getattr(text, "rope_parameters", None) or {}
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        return rope_of(params["full_attention"], 1e6), rope_of(local, 10000.0)
    scaling = dict(getattr(text, "rope_scaling", None) or {})
    local = float(getattr(text, "rope_local_base_freq", 10000.0))
    return rope_of(scaling, getattr(text, "rope_theta", 1e6)), RopeConfig(local)


def read_config(config: ModelConfig, hf: Any) -> GemmaConfig:
    """Gemma 3's fields from its text config (a multimodal checkpoint's ``text_config``)."""
    text = hf.get_text_config()
    global_rope, local_rope = ropes(text)
    multimodal = MULTIMODAL in (getattr(hf, "architectures", None) or [])
    return GemmaConfig(
        **{**vars(config), "rope": global_rope},
        **gemma_fields(text, sliding_pattern=6),
        attn_softcap=None,
        final_softcap=None if multimodal else getattr(text, "final_logit_softcapping", None),
        local_rope=local_rope,
        qk_norm=True,
    )


class Gemma3Model(GemmaModel):
    """The Gemma decoder with per-head q/k norms (set by the config); reads the language model
    of a multimodal checkpoint and skips its vision tensors."""

    def parameter_for(self, checkpoint_name: str) -> tuple[str, int | None] | None:
        if checkpoint_name.startswith(_VISION_PREFIXES):
            return None
        for prefix, text_prefix in _TEXT_PREFIXES:
            if checkpoint_name.startswith(prefix):
                checkpoint_name = text_prefix + checkpoint_name.removeprefix(prefix)
                break
        return super().parameter_for(checkpoint_name)


FAMILY = ModelFamily(
    "gemma3",
    ("Gemma3ForCausalLM", MULTIMODAL),
    "gemma3_text",
    Gemma3Model,
    read_config=read_config,
    fast_forward=GemmaFusedForward,
)
