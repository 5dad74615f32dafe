"""Read a checkpoint's config.json and normalise it into ``ModelConfig``, once.

The common fields are read here the way transformers' configs spell them in versions 4 and 5
(``rope_parameters`` or ``rope_theta`` with ``rope_scaling``, one EOS id or a list, a missing
``head_dim`` or ``num_key_value_heads``); the checkpoint's family (``execution/models``) then
reads its own fields (``ModelFamily.read_config``). Model code never reads the Hugging Face
config itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ..config import ModelConfig, RopeConfig
from ..errors import ModelNotFoundError
from ..execution.models.registry import family_for
from .model_source import ModelSource


def read_model_config(source: ModelSource) -> ModelConfig:
    """The checkpoint's normalised config; raises ``UnsupportedModelError``, or
    ``ModelNotFoundError`` when transformers cannot read it. The EOS ids are the config's and
    its generation config's (``generation_config.json``: instruct checkpoints list their
    end-of-turn tokens there, as Gemma's ``<end_of_turn>``)."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(source.path))
    except (OSError, ValueError) as e:  # transformers' errors for a missing or broken config
        raise ModelNotFoundError(f"cannot read the model config in {source.path}: {e}") from e
    config = normalise(hf)
    extra = _generation_eos(source)
    if extra:
        config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))
    return config


def _generation_eos(source: ModelSource) -> tuple[int, ...]:
    """The ``eos_token_id`` of the checkpoint's ``generation_config.json`` (none if absent)."""
    path = source.path / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()  # an unreadable generation config leaves the model's own EOS ids
    return _ids(eos)


def _ids(eos: Any) -> tuple[int, ...]:
    """One EOS id, a list of them or None as a tuple."""
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def normalise(hf: Any) -> ModelConfig:
    """A ``transformers.PretrainedConfig`` as its family's ``ModelConfig``; raises
    ``UnsupportedModelError`` for an architecture or rope scaling the engine does not run.
    A multimodal checkpoint's decoder is read from its text config (``get_text_config``), the
    part the engine runs; its EOS ids from the top level where it sets them."""
    family = family_for(
        list(getattr(hf, "architectures", None) or []), getattr(hf, "model_type", "?")
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
        eos_token_ids=_ids(eos if eos is not None else getattr(text, "eos_token_id", None)),
    )
    return family.read_config(common, hf)


def rope_config(hf: Any) -> RopeConfig:
    """The rotary embedding's parameters; raises ``UnsupportedModelError`` for a scaling other
    than none, ``linear`` or ``llama3``."""
    # transformers 5 keeps everything in rope_parameters; 4.x uses rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    return RopeConfig.from_parameters({**scaling, **params}, getattr(hf, "rope_theta", 10000.0))
