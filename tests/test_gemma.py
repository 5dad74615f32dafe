"""Gemma 2 and Gemma 3 (text) against transformers: greedy tokens through the engine with every
CPU attention backend and the Triton kernels (interpreter), shared prefixes longer than the
sliding window read as prefix levels, preemption and n > 1; the logits themselves (final
soft-cap); the CPU fast path against the plain modules; the config fields each family reads;
Gemma 3's multimodal checkpoints run as text models."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (
    EOS,
    TOKENS,
    VOCAB,
    finish_gguf,
    gguf_header,
    hf_greedy,
    nested_prompts,
    save_tokenizer,
    shared_prefix_prompts,
)
from prefixbatch import LLM, SamplingParams
from prefixbatch.config import RopeConfig
from prefixbatch.errors import UnsupportedModelError
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.step import AttentionStep, SeqStep
from prefixbatch.execution.models.gemma import GemmaConfig
from prefixbatch.execution.models.gemma3 import ropes
from prefixbatch.execution.models.gemma_fused_forward import GemmaFusedForward
from prefixbatch.loading.model_config import normalise

FAMILIES = ["gemma2", "gemma3"]
WINDOW = {"gemma2": 12, "gemma3": 16}  # tests/conftest.py's tiny configs

# Every backend reads shared prefixes as levels (cascade_min_prefix=0), so sliding layers read
# levels that lie partly or wholly before their rows' windows.
BACKENDS = {
    "torch": {"kernels": "torch"},  # the PyTorch cascade and the plain modules
    "cpu": {"kernels": "auto"},  # the C++ kernels and the fused fast path
}


def run(path: Path, prompts, max_tokens, **options):  # type: ignore[no-untyped-def]
    """The engine's greedy tokens and the attention steps its backend was given."""
    llm = LLM(str(path), device="cpu", block_size=8, cascade_min_prefix=0, **options)
    backend = llm.engine.backend
    steps: list[AttentionStep] = []
    stage = backend.stage
    backend.stage = lambda step, *a: steps.append(step) or stage(step, *a)  # type: ignore[method-assign]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
    outs = llm.generate(prompts, params)
    return llm, [o.output_token_ids for o in outs], steps


def levels_against_windows(steps: list[AttentionStep], window: int) -> tuple[bool, bool]:
    """Whether some row read a prefix level wholly before its window, and some row one that
    its window cuts."""
    before = cut = False
    for step in steps:
        for lvl in step.levels:
            for s in step.seqs[lvl.first_seq : lvl.first_seq + lvl.num_seqs]:
                first_seen = s.context_len - s.q_len - window + 1  # of its first query
                before |= lvl.end <= first_seen
                cut |= lvl.start < first_seen < lvl.end
    return before, cut


def gemma_prompts(seed: int) -> list[list[int]]:
    """A system prompt > two documents > three questions each (levels of 24 tokens, longer than
    the windows), plus a few prompts sharing 40-54 tokens and some sharing nothing."""
    rng = random.Random(seed)
    nested = nested_prompts(rng, system=24, doc=24, docs=2, per_doc=3, vocab=(3, VOCAB))
    return nested + shared_prefix_prompts(6, seed=seed)


PROMPTS = gemma_prompts(seed=4)
MAX_TOKENS = [8 + i % 5 for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def expected(tiny_models):  # type: ignore[no-untyped-def]
    """transformers' greedy continuations of ``PROMPTS``, per family, computed once."""
    done: dict[str, list[list[int]]] = {}

    def of(family: str) -> list[list[int]]:
        if family not in done:
            done[family] = hf_greedy(tiny_models[family], PROMPTS, MAX_TOKENS)
        return done[family]

    return of


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_transformers_with_prefix_levels(tiny_models, expected, family, backend):  # type: ignore[no-untyped-def]
    llm, got, steps = run(
        tiny_models[family],
        PROMPTS,
        MAX_TOKENS,
        kv_cache_memory=16 * 2**20,
        max_num_batched_tokens=64,
        **BACKENDS[backend],
    )
    assert got == expected(family)
    fast = backend == "cpu"
    assert isinstance(llm.engine.backend, CpuBackend if fast else SharedPrefixBackend)
    assert isinstance(llm.engine.worker.forward, GemmaFusedForward) == fast
    assert levels_against_windows(steps, WINDOW[family]) == (True, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_the_triton_kernels(tiny_models, family):  # type: ignore[no-untyped-def]
    """The Triton backend under the interpreter: levels before and across the window, prefill
    chunks mixed with decode rows, decode steps through the CUDA-graph buffers (run eagerly)."""
    pytest.importorskip("triton")
    from prefixbatch.execution.attention.triton_backend import TritonBackend

    rng = random.Random(6)
    prompts = nested_prompts(rng, system=24, doc=8, docs=2, per_doc=2, vocab=(3, VOCAB))
    max_tokens = [4] * len(prompts)
    llm, got, steps = run(
        tiny_models[family],
        prompts,
        max_tokens,
        kv_cache_memory=4 * 2**20,
        attention_backend="triton",
        max_num_batched_tokens=24,
        max_cuda_graph_batch=4,
    )
    assert isinstance(llm.engine.backend, TritonBackend)
    assert got == hf_greedy(tiny_models[family], prompts, max_tokens)
    assert levels_against_windows(steps, WINDOW[family]) == (True, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_with_preemption_and_n(tiny_models, expected, family):  # type: ignore[no-untyped-def]
    """A KV pool of 16 blocks of 8: decode growth preempts (the levels' members recompute);
    n = 2 greedy choices are both transformers' continuation."""
    llm = LLM(
        str(tiny_models[family]),
        device="cpu",
        block_size=8,
        cascade_min_prefix=0,
        kv_cache_memory=16 * llm_block_bytes(family),
        max_num_batched_tokens=64,
    )
    params = [SamplingParams(max_tokens=m, temperature=0, n=2) for m in MAX_TOKENS]
    outs = llm.generate(PROMPTS, params)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[e, e] for e in expected(family)]
    assert llm.engine.stats.preemptions > 0


def llm_block_bytes(family: str) -> int:
    """KV bytes of one block of 8 positions of the tiny config (3 layers, 2 KV heads, fp32)."""
    head_dim = {"gemma2": 16, "gemma3": 32}[family]
    return 2 * 3 * 8 * 2 * head_dim * 4


def hf_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_and_the_fast_path_the_modules(tiny_models, family):  # type: ignore[no-untyped-def]
    """A 40-token prompt as one prefill, every row's logits: the plain modules against
    transformers' (final soft-cap included, which greedy tokens cannot show), the CPU fast path
    against the plain modules."""
    rng = random.Random(9)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    llm = LLM(str(tiny_models[family]), device="cpu", block_size=8, kv_cache_memory=2**20)
    worker = llm.engine.worker
    assert isinstance(worker.forward, GemmaFusedForward)
    backend = worker.backend
    step = AttentionStep.of((SeqStep(0, 40, 40, tuple(range(5))),), block_size=8)
    ids, positions, rows = torch.tensor(prompt), torch.arange(40), torch.arange(40)
    plain = worker.model(ids, positions, backend, backend.prepare(step), rows)
    fast = worker.forward(ids, positions, backend, backend.prepare(step), rows)
    expected = hf_logits(tiny_models[family], prompt)
    cap = {"gemma2": 3.0, "gemma3": 4.0}[family]
    assert plain.abs().max() < cap and expected.abs().max() > 0.8 * cap  # the cap binds
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def gemma_config(family: str, **changes):  # type: ignore[no-untyped-def]
    from conftest import tiny_config

    config = tiny_config(family)
    config.architectures = [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]]
    for k, v in changes.items():
        setattr(config, k, v)
    return config


def test_gemma_configs_read_their_fields():
    g2 = normalise(gemma_config("gemma2"))
    assert isinstance(g2, GemmaConfig) and g2.architecture == "gemma2"
    assert g2.layer_windows == (12, None, 12)  # sliding first, alternating
    assert (g2.attn_softcap, g2.final_softcap, g2.attention_scale) == (5.0, 3.0, 24**-0.5)
    assert not g2.qk_norm and g2.local_rope is None
    g3 = normalise(gemma_config("gemma3"))
    assert g3.layer_windows == (16, None, 16) and g3.qk_norm
    assert g3.attn_softcap is None  # Gemma 3's attention never soft-caps
    assert g3.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
    assert g3.local_rope == RopeConfig(theta=10000.0)
    assert g3.layer_attention(0).window == 16 and g3.layer_attention(1).window is None


def test_older_gemma3_configs_read_their_ropes_and_layer_pattern():
    """transformers 4.x spelled Gemma 3's ropes as rope_theta, rope_scaling and
    rope_local_base_freq, and had no layer_types (every sixth layer global)."""
    old = SimpleNamespace(
        rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
        rope_local_base_freq=10000.0,
    )  # fmt: skip
    assert ropes(old) == (RopeConfig(1e6, "linear", 8.0), RopeConfig(10000.0))
    config = gemma_config("gemma3", num_hidden_layers=7)
    del config.layer_types
    assert normalise(config).layer_windows == (16, 16, 16, 16, 16, None, 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_activation": "relu"}, "activation 'relu'"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
        ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "chunked"),
    ],
)
def test_gemma_configs_the_engine_cannot_run_are_clear_errors(changes, message):  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedModelError, match=message):
        normalise(gemma_config("gemma2", **changes))


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma3ForConditionalGeneration checkpoint (a 2-layer SigLIP vision tower beside
    the tiny Gemma 3 text model) and an EOS id more in its generation config."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from conftest import tiny_config

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(3)
    model = Gemma3ForConditionalGeneration(config)
    for name, p in model.named_parameters():
        if "norm" in name and "language_model" in name:
            torch.nn.init.normal_(p, std=0.3)
    path = tmp_path_factory.mktemp("gemma3-mm")
    model.save_pretrained(str(path))
    model.generation_config.eos_token_id = [EOS, 7]
    model.generation_config.save_pretrained(str(path))
    save_tokenizer(path)
    return path


def test_gemma3_multimodal_checkpoints_run_as_text_models(gemma3_multimodal):  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    with safe_open(str(next(gemma3_multimodal.glob("*.safetensors"))), "pt") as f:
        names = list(f.keys())
    assert any("vision_tower" in n for n in names)  # skipped by the loader
    prompts = gemma_prompts(seed=7)[:8]
    expected = hf_greedy(gemma3_multimodal, prompts, [8] * len(prompts))
    llm = LLM(str(gemma3_multimodal), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    cfg = llm.engine.worker.model_config
    assert cfg.architecture == "gemma3" and cfg.final_softcap is None  # type: ignore[attr-defined]
    assert cfg.eos_token_ids == (EOS, 7)  # the generation config's end-of-turn id too
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    # transformers stops at EOS only (hf_greedy); the engine was told to ignore it
    assert [o.output_token_ids[: len(e)] for o, e in zip(outs, expected)] == expected


def test_gemma3_reads_the_language_model_under_either_prefix():
    """transformers 5 writes ``model.language_model.``, older checkpoints
    ``language_model.model.``; only the vision tower and projector are skipped, any other
    tensor goes to the loader (which refuses one without a place, as for every family)."""
    from prefixbatch.execution.models.gemma3 import Gemma3Model

    cfg = normalise(gemma_config("gemma3"))
    with torch.device("meta"):
        model = Gemma3Model(cfg)
    assert model.parameter_for("model.vision_tower.encoder.x.weight") is None
    assert model.parameter_for("language_model.model.layers.0.mlp.up_proj.weight") == (
        "layers.0.mlp.gate_up_proj.weight",
        1,
    )
    assert model.parameter_for("language_model.lm_head.weight") == ("lm_head.weight", None)
    assert model.parameter_for("model.language_model.norm.weight") == ("norm.weight", None)
    assert model.parameter_for("visual.blocks.0.weight") == ("visual.blocks.0.weight", None)


def test_the_embedding_scale_rounds_to_the_weights_dtype(tiny_models):  # type: ignore[no-untyped-def]
    """sqrt(hidden) in bf16, as transformers rounds it (sqrt(64) = 8 is exact: use 96)."""
    from prefixbatch.execution.models.gemma import GemmaModel

    cfg = replace(normalise(gemma_config("gemma2")), hidden_size=96)
    model = GemmaModel(cfg).to(torch.bfloat16)
    model.finish_loading(set())
    assert model.embed_scale.dtype == torch.bfloat16
    assert model.embed_scale.item() == torch.tensor(96**0.5, dtype=torch.bfloat16).item() != 96**0.5


def write_gguf(hf_dir: Path, out: Path, arch: str) -> Path:
    """The tiny checkpoint as llama.cpp's converter writes it: ``gguf``'s tensor names for
    ``arch``, norm weights stored as 1 + w, fp32 tensors, the word-level vocabulary as a
    sentencepiece one (what transformers' GGUF reader builds Gemma's tokenizer from); no
    ``lm_head`` (llama.cpp ties Gemma's output to the embeddings)."""
    import json

    import gguf
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(next(hf_dir.glob("*.safetensors"))))
    writer = gguf.GGUFWriter(str(out), arch)
    gguf_header(writer, config)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([2, 3, 3, *([1] * (VOCAB - 3))])  # unknown, control, normal
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    for name, tensor in tensors.items():
        base, suffix = name.rsplit(".", 1)
        if names.get_name(base) is None:  # lm_head: Gemma files tie it to the embeddings
            continue
        data = tensor.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    finish_gguf(writer)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_files_match_transformers_reading_them(tiny_models, family, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A Gemma GGUF file converted once (llama.cpp's names and its + 1 on norms undone) gives
    transformers' greedy tokens for the same file. transformers' GGUF reader fills what the file
    does not say with its defaults (soft-caps 50 and 30 for Gemma 2, query_pre_attn_scalar 256):
    both sides read the config through it."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from prefixbatch.loading import model_source

    monkeypatch.setattr(model_source, "cache_root", lambda: tmp_path / "cache")
    path = write_gguf(tiny_models[family], tmp_path / f"{family}.gguf", family)
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    assert llm.engine.worker.model_config.architecture == family
    prompts = PROMPTS[:8]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    hf.eval()
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            gen = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                eos_token_id=EOS, pad_token_id=EOS,
            )  # fmt: skip
        assert out.output_token_ids == gen[0, len(prompt) :].tolist()
