"""Embeddings (``LLM.embed``) against a plain transformers forward with the same pooling (fp32):
last-token and mean pooling, with shared prefixes computed once, chunked prefill, every
scheduling policy and both CPU paths (fused kernels and the PyTorch reference)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VOCAB, make_tiny_model
from prefixbatch import LLM
from prefixbatch.errors import UnsupportedModelError
from prefixbatch.loading.pooling_config import read_pooling_config
from prefixbatch.pooling import EmbeddingParams, PoolingConfig

TOLERANCE = 1e-5


def add_sentence_transformers(path: Path, mode: str, normalize: bool = True) -> None:
    """sentence-transformers' files of a model whose ``Pooling`` module uses ``mode``."""
    kinds = ["Transformer", "Pooling", "Normalize"][: 3 if normalize else 2]
    folders = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": folders[i], "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(kinds)
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = ["cls_token", "mean_tokens", "max_tokens", "lasttoken"]
    config = {f"pooling_mode_{m}": m == mode for m in modes} | {"word_embedding_dimension": 64}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


def declare_matryoshka(path: Path, sizes: list[int]) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": sizes}))


@pytest.fixture(scope="module")
def embedding_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``last``: a Qwen3 with no sentence-transformers files (last token, normalised) that
    declares Matryoshka sizes; ``mean``: a Llama whose files say mean pooling."""
    root = tmp_path_factory.mktemp("embedding-models")
    last = make_tiny_model(root / "last", "qwen3")
    declare_matryoshka(last, [16, 32, 64])
    mean = make_tiny_model(root / "mean", "llama")
    add_sentence_transformers(mean, "mean_tokens")
    return {"last": last, "mean": mean}


def hf_embeddings(path: Path, prompts: list[list[int]], method: str) -> list[np.ndarray]:
    """transformers' last_hidden_state (fp32, one prompt at a time), pooled, L2-normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            states = model(torch.tensor([p])).last_hidden_state[0]
            pooled = states[-1] if method == "last" else states.mean(dim=0)
            out.append(torch.nn.functional.normalize(pooled, dim=0).numpy())
    return out


def corpus(n: int, seed: int) -> list[list[int]]:
    """Prompts below a shared 20-token instruction, some sharing more, one equal to it."""
    rng = random.Random(seed)
    instruction = [rng.randrange(3, VOCAB) for _ in range(20)]
    topic = [rng.randrange(3, VOCAB) for _ in range(12)]
    prompts = [list(instruction)]
    for i in range(n - 1):
        middle = topic if i % 3 == 0 else []
        prompts.append(instruction + middle + [rng.randrange(3, VOCAB) for _ in range(5 + i % 17)])
    return prompts


MODES = {
    "batchllm": {"policy": "batchllm"},
    "fcfs-lru": {"policy": "fcfs-lru"},
    "torch-cascade": {"policy": "batchllm", "kernels": "torch", "cascade_min_prefix": 0},
    "chunked": {"policy": "batchllm", "max_num_batched_tokens": 24},
}


@pytest.mark.parametrize("method", ["last", "mean"])
@pytest.mark.parametrize("mode", MODES)
def test_embeddings_match_transformers(embedding_models, method, mode):  # type: ignore[no-untyped-def]
    prompts = corpus(24, seed=3)
    expected = hf_embeddings(embedding_models[method], prompts, method)
    llm = LLM(
        str(embedding_models[method]),
        device="cpu",
        block_size=8,
        kv_cache_memory=16 * 2**20,
        **MODES[mode],
    )
    got = llm.embed(prompts, use_tqdm=False)
    assert len(got) == len(prompts)
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and g.shape == (64,)
        assert np.abs(g - e).max() <= TOLERANCE
    if mode == "batchllm":  # the instruction was computed once for the whole corpus
        assert llm.engine.stats.prefill_tokens_saved >= 20 * (len(prompts) - 2)
    assert llm.engine.blocks.num_available == llm.engine.limits.num_blocks  # nothing kept


def test_text_inputs_and_matryoshka_dimensions(embedding_models):  # type: ignore[no-untyped-def]
    llm = LLM(str(embedding_models["last"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    full = llm.embed(["w5 w6 w7", "w8 w9"], use_tqdm=False)
    ids = [llm.tokenizer.encode("w5 w6 w7"), llm.tokenizer.encode("w8 w9")]
    assert all(np.array_equal(a, b) for a, b in zip(full, llm.embed(ids, use_tqdm=False)))
    cut = llm.embed("w5 w6 w7", dimensions=16, use_tqdm=False)[0]
    assert cut.shape == (16,)
    expected = full[0][:16] / np.linalg.norm(full[0][:16])
    assert np.abs(cut - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match="'dimensions' must be one of 16, 32, 64"):
        llm.embed("w5", dimensions=20, use_tqdm=False)
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.embed([[]], use_tqdm=False)


def test_generation_and_embeddings_are_not_mixed(embedding_models):  # type: ignore[no-untyped-def]
    from prefixbatch import SamplingParams
    from prefixbatch.outputs import Request

    llm = LLM(str(embedding_models["last"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    embed = SamplingParams(max_tokens=1, embedding=EmbeddingParams())
    mixed = [Request(0, [5, 6], embed), Request(1, [5, 7], SamplingParams(max_tokens=2))]
    with pytest.raises(ValueError, match="cannot be in flight together"):
        llm.engine.add_requests(mixed)
    text = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(text[0].output_token_ids) == 3  # the engine still generates afterwards


def test_pooling_config_from_files(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text(json.dumps({"is_matryoshka": True}))
    assert read_pooling_config(tmp_path) == PoolingConfig("last", True, True, ())
    add_sentence_transformers(tmp_path, "mean_tokens", normalize=False)
    assert read_pooling_config(tmp_path) == PoolingConfig("mean", False, True, ())
    add_sentence_transformers(tmp_path, "lasttoken")
    assert read_pooling_config(tmp_path).method == "last"
    add_sentence_transformers(tmp_path, "cls_token")
    with pytest.raises(UnsupportedModelError, match="pooling_mode_cls_token"):
        read_pooling_config(tmp_path)


def test_dimensions_need_matryoshka():  # type: ignore[no-untyped-def]
    plain = PoolingConfig()
    assert "'dimensions' is not supported" in (plain.check(EmbeddingParams(8), 64) or "")
    assert PoolingConfig(matryoshka=True).check(EmbeddingParams(65), 64) is not None
    assert PoolingConfig(matryoshka=True).check(EmbeddingParams(64), 64) is None


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_gemma_last_token_embeddings_match_transformers(tiny_models, family, kernels):  # type: ignore[no-untyped-def]
    """A causal Gemma 2 / Gemma 3 as an embedding model (last token, normalised): its sliding
    windows, (1 + w) norms and scaled embeddings, shared prefixes computed once, equal to
    transformers' ``last_hidden_state``."""
    path = tiny_models[family]
    prompts = corpus(12, seed=5)
    expected = hf_embeddings(path, prompts, "last")
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=16 * 2**20, kernels=kernels)
    got = llm.embed(prompts, use_tqdm=False)
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) <= TOLERANCE
    assert llm.engine.stats.prefill_tokens_saved >= 16 * (len(prompts) - 2)
