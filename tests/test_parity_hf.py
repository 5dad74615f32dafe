"""The whole engine against Hugging Face transformers' greedy output, token for token (fp32)."""

from __future__ import annotations

import pytest

from conftest import hf_greedy, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.models.fused_forward import FusedForward

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3"]


def _run(path, prompts, max_tokens, **kwargs):  # type: ignore[no-untyped-def]
    llm = LLM(str(path), device="cpu", block_size=8, **kwargs)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
    return llm, [o.output_token_ids for o in llm.generate(prompts, params)]


# The default attention on the CPU is the compiled decode kernel; "torch-cascade" runs the plain
# PyTorch paths with shared-prefix (cascade) attention for every group, however short.
MODES = {
    "fcfs": {"policy": "fcfs"},
    "batchllm": {"policy": "batchllm"},
    "torch-cascade": {"policy": "batchllm", "kernels": "torch", "cascade_min_prefix": 0},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_greedy_matches_transformers(tiny_models, family, mode):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(36, seed=1)
    max_tokens = [4 + (i * 7) % 13 for i in range(len(prompts))]
    expected = hf_greedy(tiny_models[family], prompts, max_tokens)
    llm, got = _run(
        tiny_models[family],
        prompts,
        max_tokens,
        kv_cache_memory=64 * 2**20,
        max_num_batched_tokens=256,
        **MODES[mode],
    )
    assert got == expected
    # CI has a compiler: the default runs the compiled kernels, "torch" the PyTorch paths.
    fast = MODES[mode].get("kernels", "auto") == "auto"
    assert isinstance(llm.engine.backend, CpuBackend) == fast
    assert isinstance(llm.engine.worker.forward, FusedForward) == fast
    if MODES[mode]["policy"] == "batchllm":
        assert llm.engine.stats.groups > 0  # the shared prefixes were actually shared


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", ["fcfs", "fcfs-lru", "batchllm"])
def test_greedy_matches_with_preemption(tiny_models, family, policy):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(32, seed=2)
    max_tokens = [24] * len(prompts)
    expected = hf_greedy(tiny_models[family], prompts, max_tokens)
    # 24 blocks of 8 tokens: a few sequences at a time, so decode growth forces preemption.
    per_block = 2 * 3 * 8 * 2 * (16 if family == "llama" else 32) * 4
    llm, got = _run(
        tiny_models[family],
        prompts,
        max_tokens,
        policy=policy,
        kv_cache_memory=24 * per_block,
        max_num_batched_tokens=64,
    )
    assert got == expected
    assert llm.engine.stats.preemptions > 0


def test_prompts_equal_to_a_shared_prefix_and_duplicates(tiny_models):  # type: ignore[no-untyped-def]
    """A prompt that is exactly a block-aligned shared prefix takes its first token from the
    leader's logits; exact duplicates share everything but their last token's own compute."""
    head = [(i * 37) % 500 + 3 for i in range(32)]  # 4 blocks of 8
    prompts = [head, head, head + [7, 8], head + [9], head + [9], head[:16] + [11] * 16]
    prompts += [head + [7, 8] + [12] * 6]  # a prompt ending exactly on a deeper level
    max_tokens = [5, 1, 6, 4, 4, 5, 3]
    expected = hf_greedy(tiny_models["qwen2"], prompts, max_tokens)
    llm, got = _run(tiny_models["qwen2"], prompts, max_tokens, policy="batchllm")
    assert got == expected
    assert llm.engine.stats.groups >= 2
