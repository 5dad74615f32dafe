"""Config fields transformers' GGUF reader leaves out, read from what llama.cpp's converter
writes into the file.

transformers rebuilds a config from a GGUF file's metadata by a table per architecture
(``integrations/ggml.py``). For ``phi3`` the table stops at the common fields: it drops
``phi3.rope.dimension_count`` (the rotated dimensions of each head: 96 of 128 for Phi-4-mini)
and ``phi3.attention.sliding_window`` (0 for none), and reads nothing of LongRoPE, which
llama.cpp's converter (``convert_hf_to_gguf.py``, ``Phi3MiniModel``) stores as
``phi3.rope.scaling.original_context_length``, ``phi3.rope.scaling.attn_factor`` and the
factors as the tensors ``rope_factors_short.weight`` and ``rope_factors_long.weight``. Without
them a Phi-3-128k or Phi-4-mini file would run with the wrong rotary embedding. For
mixture-of-experts files (``qwen2moe``, ``qwen3moe``) it leaves ``moe_intermediate_size`` and
``shared_expert_intermediate_size`` at their defaults; llama.cpp writes them as
``{arch}.expert_feed_forward_length`` and ``{arch}.expert_shared_feed_forward_length``.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError

# Tensors that hold config values, not weights.
CONFIG_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def complete_config(config: Any, reader: Any) -> None:
    """Set on ``config`` (the transformers config read from the file) what its architecture's
    table leaves out, from ``reader`` (a ``gguf.GGUFReader`` of the file). Raises
    ``UnsupportedModelError`` for a ``llama`` file with experts (llama.cpp writes Mixtral so;
    transformers reads it as a dense Llama)."""
    arch = str(reader.fields["general.architecture"].contents())
    if arch == "phi3":
        _complete_phi3(config, reader)
    _complete_experts(config, reader, arch)


def _field(reader: Any, key: str) -> Any:
    """A metadata value, or None when the file has no such key."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _complete_experts(config: Any, reader: Any, arch: str) -> None:
    if arch == "llama" and (_field(reader, "llama.expert_count") or 0) > 0:
        raise UnsupportedModelError(
            "a llama GGUF file with experts (Mixtral) is not supported; "
            "use its Hugging Face checkpoint"
        )
    for key, attribute in (
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    ):
        value = _field(reader, f"{arch}.{key}")
        if value is not None and hasattr(config, attribute):
            setattr(config, attribute, int(value))


def _complete_phi3(config: Any, reader: Any) -> None:
    from gguf.quants import dequantize

    rope = dict(config.rope_parameters)
    rotated = _field(reader, "phi3.rope.dimension_count")
    if rotated is not None:
        rope["partial_rotary_factor"] = int(rotated) / (
            config.hidden_size // config.num_attention_heads
        )
    window = _field(reader, "phi3.attention.sliding_window")
    if window is not None:
        config.sliding_window = int(window) or None
    factors = {
        t.name: dequantize(t.data, t.tensor_type).reshape(-1).tolist()
        for t in reader.tensors
        if t.name in CONFIG_TENSORS
    }
    if len(factors) == len(CONFIG_TENSORS):
        original = int(_field(reader, "phi3.rope.scaling.original_context_length"))
        config.original_max_position_embeddings = original
        rope.update(
            rope_type="longrope",
            short_factor=factors[CONFIG_TENSORS[0]],
            long_factor=factors[CONFIG_TENSORS[1]],
            original_max_position_embeddings=original,
        )
        attention = _field(reader, "phi3.rope.scaling.attn_factor")
        if attention is not None:
            rope["attention_factor"] = float(attention)
    config.rope_parameters = rope
