"""Mixture-of-experts models from GGUF files: Qwen2-MoE and Qwen3-MoE (the architectures
transformers' GGUF reader maps) written the way llama.cpp writes them (stacked expert tensors,
the router as ``ffn_gate_inp``, the shared expert as ``*_shexp``, the expert sizes as
``expert_feed_forward_length``), loaded and run against transformers on the checkpoint they
were written from; Mixtral (a ``llama`` file with experts), OLMoE and DeepSeek (``deepseek2``)
files are clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    TOKENS,
    VOCAB,
    finish_gguf,
    gguf_header,
    hf_greedy,
    shared_prefix_prompts,
    tiny_config,
)
from prefixbatch import LLM, SamplingParams
from prefixbatch.errors import UnsupportedModelError
from prefixbatch.loading import model_source
from prefixbatch.loading.model_source import ModelSource

gguf = pytest.importorskip("gguf")

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}  # fmt: skip
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(\w+)")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def gguf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A checkpoint's tensors under llama.cpp's names, each expert projection stacked."""
    out: dict[str, np.ndarray] = {}
    stacked: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in tensors.items():
        array = tensor.float().numpy()
        if match := EXPERT.fullmatch(name):
            layer, expert, projection = match.groups()
            stacked.setdefault(f"blk.{layer}.ffn_{projection}_exps.weight", {})[int(expert)] = array
        elif name in TOP_NAMES:
            out[TOP_NAMES[name]] = array
        else:
            layer, module, suffix = re.fullmatch(
                r"model\.layers\.(\d+)\.(.+)\.(\w+)", name
            ).groups()  # type: ignore[union-attr]
            key = f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"
            out[key] = array.reshape(-1) if module == "mlp.shared_expert_gate" else array
    for key, experts in stacked.items():
        out[key] = np.stack([experts[e] for e in sorted(experts)])
    return out


def write_gguf(model_dir: Path, path: Path, arch: str, config, tensors=None) -> Path:  # type: ignore[no-untyped-def]
    """``model_dir``'s checkpoint as an fp32 GGUF file of ``arch`` with a byte-level BPE
    tokenizer over the test vocabulary."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(arch)
    gguf_header(writer, config.to_dict())
    writer.add_key_length(getattr(config, "head_dim", None) or 16)
    writer.add_value_length(getattr(config, "head_dim", None) or 16)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * VOCAB)  # no merges: transformers derives them
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if tensors is None:
        tensors = gguf_tensors(dict(ModelSource(model_dir).weights()))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    finish_gguf(writer)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """GGUF conversions go to a temporary cache (the compiled kernels stay where they are)."""
    monkeypatch.setattr(model_source, "cache_root", lambda: tmp_path / "cache")


def all_sparse(family: str):  # type: ignore[no-untyped-def]
    """The tiny config with experts in every layer: llama.cpp's Qwen-MoE files have no
    ``decoder_sparse_step`` or ``mlp_only_layers``."""
    config = tiny_config(family)
    config.decoder_sparse_step, config.mlp_only_layers = 1, []
    return config


@pytest.mark.parametrize(("family", "arch"), [("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe")])
def test_gguf_moe_matches_transformers(tmp_path, cache, family, arch):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = all_sparse(family)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "hf"))
    path = write_gguf(tmp_path / "hf", tmp_path / f"{family}.gguf", arch, config)
    prompts = shared_prefix_prompts(6, seed=4)
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=4 * 2**20)
    cfg = llm.engine.worker.model_config
    assert cfg.architecture == family and cfg.expert_intermediate_size == 32  # type: ignore[attr-defined]
    assert cfg.shared_expert_intermediate_size == (48 if family == "qwen2_moe" else 0)  # type: ignore[attr-defined]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    expected = hf_greedy(tmp_path / "hf", prompts, [6] * len(prompts))
    assert [o.output_token_ids for o in outs] == expected


def test_gguf_mixtral_and_olmoe_are_clear_errors(moe_models, tmp_path, cache):  # type: ignore[no-untyped-def]
    mixtral = tiny_config("mixtral")
    tensors = {"token_embd.weight": np.zeros((VOCAB, 64), np.float32)}
    path = write_gguf(moe_models["mixtral"], tmp_path / "mixtral.gguf", "llama", mixtral, tensors)
    with pytest.raises(UnsupportedModelError, match="llama GGUF file with experts"):
        LLM(str(path), device="cpu", kv_cache_memory=4 * 2**20)
    olmoe = tiny_config("olmoe")
    path = write_gguf(moe_models["olmoe"], tmp_path / "olmoe.gguf", "olmoe", olmoe, tensors)
    with pytest.raises(UnsupportedModelError, match="olmoe is not supported"):
        LLM(str(path), device="cpu", kv_cache_memory=4 * 2**20)


def test_gguf_deepseek_is_a_clear_error(tmp_path, cache):  # type: ignore[no-untyped-def]
    """transformers' GGUF reader maps no DeepSeek architecture (llama.cpp's ``deepseek2``
    holds V2 and V3): the error names the file and the architecture."""
    config = tiny_config("deepseek_v2")
    tensors = {"token_embd.weight": np.zeros((VOCAB, 64), np.float32)}
    path = write_gguf(tmp_path, tmp_path / "deepseek.gguf", "deepseek2", config, tensors)
    with pytest.raises(UnsupportedModelError, match="deepseek.gguf.*deepseek2"):
        LLM(str(path), device="cpu", kv_cache_memory=4 * 2**20)
