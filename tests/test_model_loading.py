"""The execution seam: the family registry, the config normalisation, per-parameter weight
loaders, the model built in its target dtype, and the worker's choices."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from test_deepseek import FAMILIES as DEEPSEEK_PARITY_FAMILIES
from test_gemma import FAMILIES as GEMMA_PARITY_FAMILIES
from test_gpt_oss import FAMILIES as GPT_OSS_PARITY_FAMILIES
from test_moe_models import FAMILIES as MOE_PARITY_FAMILIES
from test_parity_hf import FAMILIES as PARITY_FAMILIES
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import hf_greedy, save_tokenizer, shared_prefix_prompts, tiny_config
from prefixbatch import LLM, SamplingParams
from prefixbatch.errors import ModelNotFoundError, UnsupportedModelError
from prefixbatch.execution.models.loader import build_model
from prefixbatch.execution.models.registry import FAMILIES, family_for, family_named
from prefixbatch.execution.packed_linear import MergedLinear
from prefixbatch.loading.model_config import normalise, read_model_config
from prefixbatch.loading.model_source import ModelSource


def test_every_registered_family_has_a_parity_test():
    parity = [*PARITY_FAMILIES, *GEMMA_PARITY_FAMILIES, *MOE_PARITY_FAMILIES]
    parity += GPT_OSS_PARITY_FAMILIES + DEEPSEEK_PARITY_FAMILIES
    tested = {tiny_config(name).model_type for name in parity}
    assert {f.model_type for f in FAMILIES} <= tested


def test_the_registry_names_each_architecture_once():
    arches = Counter(a for f in FAMILIES for a in f.architectures)
    assert max(arches.values()) == 1
    assert family_for(["Foo", "Qwen3ForCausalLM"]).name == "qwen3"
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        family_for(["GPT2LMHeadModel"], "gpt2")


def checkpoint_config(family: str, architecture: str):  # type: ignore[no-untyped-def]
    """The tiny config as ``save_pretrained`` writes it (with its ``architectures``)."""
    config = tiny_config(family)
    config.architectures = [architecture]
    return config


def test_families_read_their_own_config_fields():
    config = checkpoint_config("mistral", "MistralForCausalLM")
    config.sliding_window = 64
    mistral = normalise(config)
    assert (mistral.architecture, mistral.max_position) == ("mistral", 64)  # capped
    qwen3 = normalise(checkpoint_config("qwen3", "Qwen3ForCausalLM"))
    assert (qwen3.head_dim, qwen3.num_kv_heads, qwen3.eos_token_ids) == (32, 2, (2,))
    llama3 = normalise(checkpoint_config("llama3", "LlamaForCausalLM"))
    assert (llama3.rope.rope_type, llama3.rope.original_max_position) == ("llama3", 64)


def test_merged_linear_loads_each_shard_into_its_rows():
    layer = MergedLinear(4, (3, 2, 2), bias=True)
    q, k, v = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 4)
    for shard, t in enumerate((q, k, v)):
        layer.weight_loader(layer.weight, t, shard)
        layer.weight_loader(layer.bias, t[:, 0], shard)
    assert torch.equal(layer.weight.data, torch.cat([q, k, v]))
    assert torch.equal(layer.bias.data, torch.cat([q, k, v])[:, 0])
    whole = torch.randn(7, 4)  # a checkpoint that stores the merged projection
    layer.weight_loader(layer.weight, whole, None)
    assert torch.equal(layer.weight.data, whole)
    with pytest.raises(ValueError, match=r"shape \(3, 4\) where \(2, 4\)"):
        layer.weight_loader(layer.weight, q, 1)


class FakeSource(ModelSource):
    """A tiny checkpoint's directory with its tensors edited by ``edit(dict)``."""

    def __init__(self, path: Path, edit) -> None:  # type: ignore[no-untyped-def]
        super().__init__(path)
        object.__setattr__(self, "edit", edit)

    def weights(self):  # type: ignore[no-untyped-def]
        tensors = dict(ModelSource(self.path).weights())
        self.edit(tensors)  # type: ignore[attr-defined]
        yield from tensors.items()


def _drop(name: str):  # type: ignore[no-untyped-def]
    return lambda t: t.pop(name)


def _reshape(name: str):  # type: ignore[no-untyped-def]
    return lambda t: t.__setitem__(name, t[name][:-1])


def _extra(name: str):  # type: ignore[no-untyped-def]
    return lambda t: t.__setitem__(name, torch.zeros(2))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("model.layers.1.self_attn.k_proj.weight"), "no tensor for layers.1.self_attn.qkv"),
        (_drop("model.norm.weight"), "no tensor for norm.weight"),
        (_reshape("model.layers.0.mlp.up_proj.weight"), "up_proj.weight'.*shape"),
        (_extra("model.layers.0.self_attn.sinks"), "'model.layers.0.self_attn.sinks' has no place"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tiny_models, edit, message):  # type: ignore[no-untyped-def]
    source = FakeSource(tiny_models["llama"], edit)
    cfg = read_model_config(source)
    with pytest.raises(ModelNotFoundError, match=message):
        build_model(
            family_named("llama"), cfg, source.weights(), torch.device("cpu"), torch.float32
        )


class FloatAllocations(TorchDispatchMode):
    """The largest fp32 tensor any op makes while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def test_the_model_is_built_in_its_dtype_without_an_fp32_copy(tiny_models):  # type: ignore[no-untyped-def]
    source = ModelSource(tiny_models["qwen3"])
    cfg = read_model_config(source)
    weights = [(n, t.to(torch.bfloat16)) for n, t in source.weights()]
    with FloatAllocations() as seen:
        model = build_model(
            family_named("qwen3"), cfg, weights, torch.device("cpu"), torch.bfloat16
        )
    assert seen.largest <= cfg.head_dim // 2  # only the fp32 rotary frequencies
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    qkv = model.layers[2].self_attn.qkv_proj.weight
    checkpoint = dict(weights)
    k = checkpoint["model.layers.2.self_attn.k_proj.weight"]
    q_rows = cfg.num_heads * cfg.head_dim
    assert torch.equal(qkv[q_rows : q_rows + k.shape[0]], k)


def test_llama_attention_bias_covers_the_output_projection(tmp_path):  # type: ignore[no-untyped-def]
    """transformers' ``attention_bias`` biases q, k, v and o for Llama (o too, unlike Qwen2)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.attention_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():  # random biases: a zero bias would prove nothing
        if name.endswith("proj.bias"):
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(tmp_path))
    save_tokenizer(tmp_path)
    prompts = shared_prefix_prompts(4, seed=5)
    expected = hf_greedy(tmp_path, prompts, [5] * len(prompts))
    for kernels in ("auto", "torch"):
        llm = LLM(str(tmp_path), device="cpu", kv_cache_memory=4 * 2**20, kernels=kernels)
        assert llm.engine.worker.model.layers[0].self_attn.o_proj.bias is not None
        outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
        assert [o.output_token_ids for o in outs] == expected
