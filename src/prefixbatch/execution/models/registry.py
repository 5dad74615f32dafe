"""The model families the engine implements: the one place that lists them.

A Hugging Face ``architectures`` entry, or a GGUF file's ``model_type`` as transformers reads
it, picks the family. Adding a family: its file under ``execution/models/`` (the model and its
``ModelFamily``) and its entry in ``FAMILIES``. A family's ``...ForCausalLM`` decoder also reads
transformers' ``...ForSequenceClassification`` checkpoints of it (the same decoder under a
``score`` head: rerankers and reward models, ``is_classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import UnsupportedModelError
from . import (
    deepseek,
    gemma2,
    gemma3,
    gpt_oss,
    llama,
    mistral,
    mixtral,
    olmoe,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from .family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    phi3.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    # mixture-of-experts
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    mixtral.FAMILY,
    olmoe.FAMILY,
    gpt_oss.FAMILY,
    # multi-head latent attention (and mixture-of-experts)
    deepseek.V2_FAMILY,
    deepseek.V3_FAMILY,
)
_CAUSAL, _CLASSIFIER = "ForCausalLM", "ForSequenceClassification"
_BY_ARCH = {arch: f for f in FAMILIES for arch in f.architectures} | {
    arch.replace(_CAUSAL, _CLASSIFIER): f
    for f in FAMILIES
    for arch in f.architectures
    if arch.endswith(_CAUSAL)
}
_BY_NAME = {f.name: f for f in FAMILIES}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def is_classifier(architectures: Sequence[str]) -> bool:
    """Whether a checkpoint is a sequence classifier (its decoder under a ``score`` head)."""
    return any(arch.endswith(_CLASSIFIER) for arch in architectures)


def family_for(architectures: Sequence[str], model_type: str = "?") -> ModelFamily:
    """The family of a checkpoint's ``architectures``; raises ``UnsupportedModelError``
    (naming cross-encoders: bidirectional classifiers such as BERT's do not run here)."""
    for arch in architectures:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    if is_classifier(architectures):
        raise UnsupportedModelError(
            f"unsupported architecture {list(architectures)}: prefixbatch runs causal decoders "
            "only, so cross-encoders (BERT-style bidirectional classifiers such as "
            "BertForSequenceClassification or XLMRobertaForSequenceClassification) do not run "
            "here; decoder classifiers do: "
            + ", ".join(sorted(a for a in _BY_ARCH if a.endswith(_CLASSIFIER)))
        )
    raise UnsupportedModelError(
        f"unsupported architecture {list(architectures) or model_type}; "
        f"supported: {', '.join(sorted(_BY_ARCH))}"
    )


def family_named(name: str) -> ModelFamily:
    """The family whose ``name`` a normalised ``ModelConfig.architecture`` holds."""
    return _BY_NAME[name]


def family_for_gguf(model_type: str) -> ModelFamily:
    """The family of a GGUF file, by the ``model_type`` transformers reads its config as
    (``llama``, ``qwen2``, ...); raises ``UnsupportedModelError`` for another, or one whose
    GGUF files are not read (``ModelFamily.reads_gguf``)."""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None or not family.reads_gguf:
        supported = ", ".join(t for t, f in _BY_MODEL_TYPE.items() if f.reads_gguf)
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {model_type!r}; supported: {supported}"
            + ("; load its Hugging Face checkpoint instead" if family is not None else "")
        )
    return family
