"""Phi-3 and Phi-4-mini (``execution/models/phi3.py``): fused qkv / gate_up checkpoints,
LongRoPE, partial rotary, tied embeddings and the sliding-window cap, read as transformers reads
them and run token-identical to it (fp32 greedy) on every CPU backend, from Hugging Face
directories and from GGUF files written the way llama.cpp's converter writes them."""

from __future__ import annotations

import functools
import logging
import math
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import (
    TOKENS,
    VOCAB,
    finish_gguf,
    gguf_header,
    hf_greedy,
    make_tiny_model,
    nested_prompts,
    tiny_config,
)
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.triton_backend import TritonBackend, triton_available
from prefixbatch.execution.fused_ops import fused_kernels
from prefixbatch.execution.layers import RotaryEmbedding, apply_rope, rope_inv_freq
from prefixbatch.execution.models.fused_forward import FusedForward
from prefixbatch.loading.model_config import normalise, read_model_config, rope_config
from prefixbatch.loading.model_source import ModelSource


@pytest.fixture(scope="module")
def phi_models(tiny_models, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("phi3")
    shapes = ("phi3-long", "phi3-4k")
    return {"phi3": tiny_models["phi3"], **{f: make_tiny_model(root / f, f) for f in shapes}}


@functools.cache
def _expected(path: Path, prompts: tuple[tuple[int, ...], ...], max_tokens: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """transformers' greedy output, computed once for the tests that share it."""
    return hf_greedy(path, [list(p) for p in prompts], list(max_tokens))


def expected_greedy(path: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    return _expected(path, tuple(map(tuple, prompts)), tuple(max_tokens))


def checkpoint_config(shape: str):  # type: ignore[no-untyped-def]
    config = tiny_config(shape)
    config.architectures = ["Phi3ForCausalLM"]
    return config


def phi4_mini_config():  # type: ignore[no-untyped-def]
    """Phi-4-mini-instruct's config.json, its factor lists cut to its 48 rotary frequencies."""
    from transformers import Phi3Config

    rng = random.Random(4)
    return Phi3Config(
        architectures=["Phi3ForCausalLM"],
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        rope_scaling={
            "type": "longrope",
            "short_factor": [rng.uniform(1.0, 3.0) for _ in range(48)],
            "long_factor": [rng.uniform(1.0, 60.0) for _ in range(48)],
        },
        rope_theta=10000.0,
        sliding_window=262144,
        tie_word_embeddings=True,
        eos_token_id=199999,
        pad_token_id=199999,
    )


def test_phi4_mini_config_and_rope_as_transformers_computes_them():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf = phi4_mini_config()
    cfg = normalise(hf)
    rope = cfg.rope
    assert (cfg.architecture, cfg.head_dim, cfg.tie_word_embeddings) == ("phi3", 128, True)
    assert cfg.max_position == 131072  # a window past the context caps nothing
    assert (rope.rope_type, rope.partial_rotary_factor, rope.original_max_position) == (
        "longrope",
        0.75,
        4096,
    )
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    reference = Phi3RotaryEmbedding(hf)
    assert rope.attention_factor == reference.attention_scaling
    short = rope.at_context(4096)
    long = rope.at_context(4097)
    assert (short.long_context, long.long_context) == (False, True)
    assert torch.equal(rope_inv_freq(short, 128), reference.inv_freq)  # (48,): 96 dims rotate
    hf_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=4097)
    assert torch.equal(rope_inv_freq(long, 128), hf_long)
    # transformers' cos and sin (before its duplication into both halves) at long positions
    positions = torch.tensor([5000, 131071])
    x = torch.zeros(1, 2, 8)
    hf_cos, hf_sin = reference(x, positions[None])
    cos, sin = RotaryEmbedding(long, 128).cos_sin(positions, torch.float32)
    assert torch.equal(cos, hf_cos[0, :, :48]) and torch.equal(sin, hf_sin[0, :, :48])


def test_phi3_configs_read_their_variants():
    # An early Phi-3 config names LongRoPE "su" (transformers 4 kept it as written).
    early = SimpleNamespace(
        rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        rope_theta=10000.0,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
    )
    assert rope_config(early).rope_type == "longrope"
    assert rope_config(early).long_factor == (2.0,) * 4
    capped = normalise(checkpoint_config("phi3-4k"))  # Phi-3-mini-4k: window 2047 of 4096
    assert (capped.max_position, capped.rope.rope_type) == (48, "default")
    long = normalise(checkpoint_config("phi3-long")).rope
    assert (long.original_max_position, long.attention_factor) == (32, pytest.approx(2**0.5))
    # A config that gives the scale factor: transformers' attention factor follows it.
    given = SimpleNamespace(
        rope_parameters={**early.rope_scaling, "factor": 4.0, "type": "longrope"},
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
    )
    assert rope_config(given).attention_factor == math.sqrt(1 + math.log(4) / math.log(1024))
    assert rope_config(SimpleNamespace(rope_theta=1.0)).at_context(10**6).long_context is False


@pytest.mark.parametrize("t", [1, 5, 70])
def test_partial_rotary_kernel_rotates_only_the_rotary_dimensions(t):  # type: ignore[no-untyped-def]
    """The fused forward's rope call on views of each head's first 3/4 (Phi-4-mini) against
    the reference ``apply_rope``: the rest of each head and v are untouched."""
    kernels = fused_kernels()
    assert kernels is not None  # CI has a compiler
    rope = normalise(checkpoint_config("phi3")).rope
    heads, kv_heads, dim = 4, 2, 16
    cos, sin = RotaryEmbedding(rope, dim).cos_sin(torch.randint(0, 1024, (t,)), torch.float32)
    assert cos.shape == (t, 6)
    torch.manual_seed(t)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(t, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(t, kv_heads, dim)
    expected_q, expected_k, before = apply_rope(q, cos, sin), apply_rope(k, cos, sin), qkv.clone()
    kernels.rotary_embedding_(q[..., :12], k[..., :12], cos, sin)
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, expected_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(q[..., 12:], before[:, : heads * dim].view(t, heads, dim)[..., 12:])
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], before[:, (heads + kv_heads) * dim :])


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int], n: int = 1):  # type: ignore[no-untyped-def]
    params = [SamplingParams(max_tokens=m, temperature=0, n=n) for m in max_tokens]
    return llm.generate(prompts, params)


# The plain PyTorch reference (shared-prefix cascade in PyTorch), the CPU fast path (fused
# forward, compiled attention) and the Triton kernels (the interpreter here, conftest.py).
BACKENDS = {
    "torch": ({"kernels": "torch"}, SharedPrefixBackend),
    "cpu": ({}, CpuBackend),
    "triton": ({"attention_backend": "triton"}, TritonBackend),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_phi4_mini_shape_matches_transformers_with_nested_prefixes_and_n(phi_models, backend):  # type: ignore[no-untyped-def]
    """Nested shared prefixes (system > document > question) read as cascade levels, every
    request with n = 2 greedy choices (both transformers' greedy output)."""
    options, backend_class = BACKENDS[backend]
    if backend == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    rng = random.Random(26)
    prompts = nested_prompts(rng, system=16, doc=16, docs=2, per_doc=2, vocab=(3, VOCAB))
    prompts += [[rng.randrange(3, VOCAB) for _ in range(11)]]  # shares nothing
    max_tokens = [3 + i % 4 for i in range(len(prompts))]
    expected = expected_greedy(phi_models["phi3"], prompts, max_tokens)
    llm = LLM(
        str(phi_models["phi3"]),
        device="cpu",
        block_size=8,
        kv_cache_memory=4 * 2**20,
        cascade_min_prefix=0,
        max_num_batched_tokens=24,  # prefill chunks cross block edges and mix with decodes
        **options,
    )
    outs = _greedy(llm, prompts, max_tokens, n=2)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[e, e] for e in expected]
    assert llm.engine.stats.groups >= 3  # the system prompt and two documents were levels
    worker = llm.engine.worker
    assert isinstance(llm.engine.backend, backend_class)
    assert isinstance(worker.forward, FusedForward) == (backend != "torch")
    if backend == "torch":  # (the fast path packs the projections, the output one among them)
        assert worker.model.lm_head.weight is worker.model.embed_tokens.weight  # tied


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_phi3_matches_transformers_under_preemption(phi_models, kernels):  # type: ignore[no-untyped-def]
    prompts = [p for p in nested_prompts(random.Random(5), 16, 8, 3, 3, (3, VOCAB))]
    max_tokens = [20] * len(prompts)
    expected = expected_greedy(phi_models["phi3"], prompts, max_tokens)
    per_block = 2 * 3 * 8 * 2 * 16 * 4  # K and V, 3 layers, 8 tokens, 2 KV heads of 16 fp32
    llm = LLM(
        str(phi_models["phi3"]),
        device="cpu",
        block_size=8,
        kv_cache_memory=14 * per_block,  # a few sequences at a time: decode growth preempts
        max_num_batched_tokens=64,
        kernels=kernels,
    )
    assert [o.output_token_ids for o in _greedy(llm, prompts, max_tokens)] == expected
    assert llm.engine.stats.preemptions > 0


def _long_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of 33 to 60 tokens (all past the 32 original positions), half sharing a prefix."""
    rng = random.Random(seed)
    head = [rng.randrange(3, VOCAB) for _ in range(34)]
    return [
        (head if i % 2 else [])
        + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(35, 60) - (34 if i % 2 else 0))]
        for i in range(n)
    ]


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_longrope_runs_the_long_factors_past_the_original_context(phi_models, kernels):  # type: ignore[no-untyped-def]
    """A context past ``original_max_position_embeddings`` runs the long factors for every
    sequence: transformers' choice for a sequence that long (these prompts all are)."""
    path = phi_models["phi3-long"]
    prompts = _long_prompts(8, seed=6)
    max_tokens = [6] * len(prompts)
    expected = expected_greedy(path, prompts, max_tokens)
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=4 * 2**20, kernels=kernels)
    assert llm.engine.worker.model_config.rope.long_context
    assert [o.output_token_ids for o in _greedy(llm, prompts, max_tokens)] == expected
    assert llm.engine.stats.groups > 0


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_longrope_runs_the_short_factors_within_the_original_context(phi_models, kernels):  # type: ignore[no-untyped-def]
    """``max_model_len`` within ``original_max_position_embeddings``: the short factors, which
    transformers runs for every sequence that short."""
    path = phi_models["phi3-long"]
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    max_tokens = [32 - len(p) for p in prompts]  # to the end of the context
    expected = expected_greedy(path, prompts, max_tokens)
    llm = LLM(
        str(path),
        device="cpu",
        block_size=8,
        kv_cache_memory=4 * 2**20,
        kernels=kernels,
        max_model_len=32,
    )
    assert not llm.engine.worker.model_config.rope.long_context
    assert [o.output_token_ids for o in _greedy(llm, prompts, max_tokens)] == expected


def test_a_window_shorter_than_the_context_caps_it(phi_models):  # type: ignore[no-untyped-def]
    """Phi-3-mini-4k's shape: untied, whole heads rotate, no scaling, the context capped at
    the 48-token window, inside which transformers' sliding-window mask hides nothing."""
    path = phi_models["phi3-4k"]
    rng = random.Random(8)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(24, 40))] for _ in range(5)]
    max_tokens = [48 - len(p) for p in prompts]
    expected = expected_greedy(path, prompts, max_tokens)
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=4 * 2**20)
    assert llm.engine.limits.max_model_len == 48
    assert isinstance(llm.engine.backend, CpuBackend)
    outs = _greedy(llm, prompts, [m + 10 for m in max_tokens])  # stop at the window
    assert [o.output_token_ids for o in outs] == expected
    assert {o.finish_reason for o in outs} <= {"length", "stop"}
    with pytest.raises(ValueError, match="context is 48 tokens"):
        _greedy(llm, [[5] * 48], [1])


def write_phi3_gguf(hf_dir: Path, path: Path) -> None:
    """A GGUF file of a Phi-3 checkpoint as llama.cpp's converter writes one
    (``convert_hf_to_gguf.py``, ``Phi3MiniModel``): fused attn_qkv and ffn_up tensors (gate and
    up), the rotated dimensions as ``rope.dimension_count``, LongRoPE's factors as tensors with
    the original context and the attention factor it derives from max / original positions,
    ``sliding_window`` 0 for none, no ``output`` tensor when the embeddings are tied; fp32."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    rope = config.rope_parameters
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_name("tiny-phi3")
    gguf_header(writer, config.to_dict())
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    rotated = int(rope["partial_rotary_factor"] * config.hidden_size) // config.num_attention_heads
    writer.add_rope_dimension_count(rotated)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(config.sliding_window or 0)
    if "long_factor" in rope:
        scale = config.max_position_embeddings / config.original_max_position_embeddings
        attention = math.sqrt(
            1 + math.log(scale) / math.log(config.original_max_position_embeddings)
        )
        writer.add_rope_scaling_attn_factors(attention if scale > 1 else 1.0)
        for kind in ("long", "short"):
            factors = np.array(rope[f"{kind}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{kind}.weight", factors)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(3, VOCAB)])
    writer.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))  # unknown, control, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, config.num_hidden_layers)
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, tensor.numpy())
    finish_gguf(writer)


def test_a_first_gguf_conversion_says_so_once(phi_models, tmp_path, monkeypatch, caplog):  # type: ignore[no-untyped-def]
    """Start-up tells a newcomer what a slow first run is doing, once (here a tiny file: the
    default model's conversion, the same code, takes 20 s)."""
    pytest.importorskip("gguf")
    from prefixbatch.loading.model_source import resolve_model

    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny.gguf"
    write_phi3_gguf(phi_models["phi3"], gguf_path)
    with caplog.at_level(logging.INFO, logger="prefixbatch"):
        first = resolve_model(str(gguf_path))
        assert first.path.is_relative_to(tmp_path / "cache")
        assert any("converting" in r.message and "once" in r.message for r in caplog.records)
        caplog.clear()
        assert resolve_model(str(gguf_path)) == first
        assert not any("converting" in r.message for r in caplog.records)


@pytest.mark.parametrize("shape", ["phi3", "phi3-long", "phi3-4k"])
def test_a_gguf_file_runs_as_its_checkpoint(phi_models, tmp_path, monkeypatch, shape):  # type: ignore[no-untyped-def]
    """What transformers' GGUF reader leaves out of a phi3 file (LongRoPE, the rotated share of
    each head, the window) is read from the file: the converted model runs token-identical to
    the Hugging Face checkpoint it was written from (transformers' own GGUF loading of it
    would not: it runs unscaled rope over whole heads)."""
    pytest.importorskip("gguf")
    from prefixbatch.loading import model_source

    monkeypatch.setattr(model_source, "cache_root", lambda: tmp_path / "cache")
    gguf_path = tmp_path / f"{shape}.gguf"
    write_phi3_gguf(phi_models[shape], gguf_path)
    converted = model_source.resolve_model(str(gguf_path)).path
    assert converted.parent.parent == tmp_path / "cache"
    cfg = read_model_config(ModelSource(converted))
    hf_cfg = normalise(checkpoint_config(shape))
    rope, hf_rope = cfg.rope, hf_cfg.rope  # the file keeps the factors in fp32, as torch uses them
    for long in (False, True):
        assert torch.equal(
            rope_inv_freq(replace(rope, long_context=long), 16),
            rope_inv_freq(replace(hf_rope, long_context=long), 16),
        )
    assert (rope.rope_type, rope.partial_rotary_factor, rope.original_max_position) == (
        hf_rope.rope_type,
        hf_rope.partial_rotary_factor,
        hf_rope.original_max_position,
    )
    assert rope.attention_factor == pytest.approx(hf_rope.attention_factor)
    assert (cfg.tie_word_embeddings, cfg.max_position) == (
        hf_cfg.tie_word_embeddings,
        hf_cfg.max_position,  # 48 for phi3-4k: its window
    )
    prompts = (
        _long_prompts(4, seed=9)
        if shape == "phi3-long"
        else nested_prompts(random.Random(9), 8, 8, 2, 2, (3, VOCAB))
    )
    max_tokens = [5] * len(prompts)
    llm = LLM(str(gguf_path), device="cpu", block_size=8, kv_cache_memory=4 * 2**20)
    outs = _greedy(llm, prompts, max_tokens)
    assert [o.output_token_ids for o in outs] == hf_greedy(phi_models[shape], prompts, max_tokens)


def test_generation_config_eos_ids_end_a_turn(phi_models, tmp_path):  # type: ignore[no-untyped-def]
    """Phi-3's turns end with ``<|end|>``, named only in generation_config.json (config.json
    names ``<|endoftext|>``): the engine stops there, as transformers' generate does."""
    import shutil

    from transformers import GenerationConfig

    path = tmp_path / "phi3"
    shutil.copytree(phi_models["phi3"], path)
    prompt = [7, 8, 9, 10, 11]
    free_run = expected_greedy(phi_models["phi3"], [prompt], [8])[0]
    end = next(t for i, t in enumerate(free_run) if i >= 2 and t not in free_run[:i])
    GenerationConfig(eos_token_id=[2, end], bos_token_id=1).save_pretrained(str(path))
    assert read_model_config(ModelSource(path)).eos_token_ids == (2, end)
    llm = LLM(str(path), device="cpu", kv_cache_memory=4 * 2**20)
    out = _greedy(llm, [prompt], [8])[0]
    assert out.output_token_ids == free_run[: free_run.index(end) + 1]
    assert out.finish_reason == "stop"
