"""Read a checkpoint's config.json and normalise it into ``ModelConfig``, once.

The common fields are read here the way transformers' configs spell them in versions 4 and 5
(``rope_parameters`` or ``rope_theta`` with ``rope_scaling``, one EOS id or a list, a missing
``head_dim`` or ``num_key_value_heads``); the checkpoint's family (``execution/models``) then
reads its own fields (``ModelFamily.read_config``). The end-of-sequence ids add those of
generation_config.json. Model code never reads the Hugging Face config itself.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import ModelConfig, RopeConfig
from ..errors import ModelNotFoundError, UnsupportedModelError
from ..execution.models.registry import family_for, is_classifier
from .model_source import ModelSource


def read_model_config(source: ModelSource) -> ModelConfig:
    """The checkpoint's normalised config; raises ``UnsupportedModelError``, or
    ``ModelNotFoundError`` when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(source.path))
    except (OSError, ValueError) as e:  # transformers' errors for a missing or broken config
        raise ModelNotFoundError(f"cannot read the model config in {source.path}: {e}") from e
    config = normalise(hf)
    eos = dict.fromkeys((*config.eos_token_ids, *generation_eos_ids(source.path)))
    return replace(config, eos_token_ids=tuple(eos))


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """The ``eos_token_id`` of the checkpoint's generation_config.json, where transformers'
    ``generate`` (and vLLM) take the ids that end a turn when config.json names only the end
    of text: Phi-3's ``<|end|>``, Phi-4-mini's 200020. () without the file."""
    from transformers import GenerationConfig

    try:
        return token_ids(GenerationConfig.from_pretrained(str(path)).eos_token_id)
    except (OSError, ValueError):  # no generation_config.json, or one transformers rejects
        return ()


def token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """An EOS field as configs spell it (one id, a list or none) as a tuple."""
    return tuple(value) if isinstance(value, (list, tuple)) else (() if value is None else (value,))


def normalise(hf: Any) -> ModelConfig:
    """A ``transformers.PretrainedConfig`` as its family's ``ModelConfig``; raises
    ``UnsupportedModelError`` for an architecture or rope scaling the engine does not run.
    A multimodal checkpoint's decoder is read from its text config (``get_text_config``), the
    part the engine runs; its EOS ids from the top level where it sets them. A sequence
    classifier must have one label (a score: what vLLM's score API reads)."""
    architectures = list(getattr(hf, "architectures", None) or [])
    family = family_for(architectures, getattr(hf, "model_type", "?"))
    num_labels = hf.num_labels if is_classifier(architectures) else 0
    if num_labels > 1:
        raise UnsupportedModelError(
            f"a sequence classifier with {num_labels} labels: only one-label score heads "
            "(rerankers, reward models) run here, for /v1/score and /v1/rerank"
        )
    text = hf.get_text_config()
    heads = text.num_attention_heads
    eos = getattr(hf, "eos_token_id", None)
    common = ModelConfig(
        architecture=family.name,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        rms_norm_eps=text.rms_norm_eps,
        rope=rope_config(text),
        max_position=text.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(text, "attention_bias", False)),
        eos_token_ids=token_ids(eos if eos is not None else getattr(text, "eos_token_id", None)),
        num_labels=num_labels,
    )
    return family.read_config(common, hf)


def rope_config(hf: Any) -> RopeConfig:
    """The rotary embedding's parameters; raises ``UnsupportedModelError`` for a scaling other
    than none, ``linear``, ``llama3``, ``longrope`` (``su`` in early Phi-3 configs) or
    ``yarn``."""
    # transformers 5 keeps everything in rope_parameters; 4.x uses rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    partial = float(partial or 1.0)
    if rope_type not in ("default", "linear", "llama3", "longrope", "yarn"):
        raise UnsupportedModelError(
            f"unsupported rope scaling {rope_type!r}; supported: linear, llama3, longrope, yarn"
        )
    if rope_type in ("default", "linear"):
        factor = float(params.get("factor", 1.0))
        return RopeConfig(theta, rope_type, factor=factor, partial_rotary_factor=partial)
    if rope_type == "longrope":
        return longrope_config(hf, params, theta, partial)
    if rope_type == "yarn":
        return yarn_config(hf, params, theta, partial)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        partial_rotary_factor=partial,
    )


def yarn_config(hf: Any, params: dict[str, Any], theta: float, partial: float) -> RopeConfig:
    """YaRN as transformers' ``_compute_yarn_parameters`` reads it: ``factor`` defaults to
    max_position_embeddings / original_max_position_embeddings, the attention factor to
    ``0.1 * ln(factor) + 1`` (with ``mscale`` and ``mscale_all_dim``: the ratio of the two
    such terms), ``beta_fast`` 32, ``beta_slow`` 1, ``truncate`` true."""
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    factor = hf.max_position_embeddings / original if factor is None else float(factor)

    def mscale(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=factor,
        original_max_position=original,
        partial_rotary_factor=partial,
        attention_factor=float(attention),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
    )


def longrope_config(hf: Any, params: dict[str, Any], theta: float, partial: float) -> RopeConfig:
    """LongRoPE as transformers' ``_compute_longrope_parameters`` reads it: the scale
    ``factor`` defaults to max_position_embeddings / original_max_position_embeddings (Phi-3
    configs give no factor) and the attention factor to sqrt(1 + ln(factor) / ln(original))."""
    original = int(  # Phi-3 configs keep it beside the rope parameters; that one wins
        getattr(hf, "original_max_position_embeddings", None)
        or params.get("original_max_position_embeddings")
        or hf.max_position_embeddings
    )
    factor = params.get("factor")
    factor = hf.max_position_embeddings / original if factor is None else float(factor)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(
        theta=theta,
        rope_type="longrope",
        factor=factor,
        original_max_position=original,
        partial_rotary_factor=partial,
        attention_factor=float(attention),
        short_factor=tuple(float(f) for f in params["short_factor"]),
        long_factor=tuple(float(f) for f in params["long_factor"]),
    )
