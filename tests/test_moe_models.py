"""The mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) through the whole
engine against transformers' greedy output, token for token in fp32, on every CPU path: the
plain PyTorch reference (experts by grouped GEMMs, cascade attention on every group), the CPU
fast path (compiled attention, fused forward, repacked experts) and the Triton kernels under
the interpreter (attention and the fused experts kernel). Every run shares nested prefixes and
asks for two choices of some requests; the PyTorch and CPU runs also preempt under a tiny KV
budget (the interpreter's run is kept short: it is slow)."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch

from conftest import MOE_FAMILIES, hf_greedy, nested_prompts, tiny_config
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.triton_backend import TritonBackend, triton_available
from prefixbatch.execution.models.fused_forward import FusedForward
from prefixbatch.execution.models.moe_decoder import SparseMoeBlock
from prefixbatch.execution.moe.cpu_experts import CpuExperts
from prefixbatch.execution.moe.experts import grouped_experts

FAMILIES = list(MOE_FAMILIES)

MODES = {
    "torch": {"kernels": "torch", "cascade_min_prefix": 0},
    "cpu": {},
    "triton": {"attention_backend": "triton", "cascade_min_prefix": 0},
}


@cache
def workload(short: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """A system prompt > 2 documents > questions, and prompts that share nothing; every third
    request asks for 2 choices. ``short``: 3 tokens of output, else 12 to 16."""
    rng = random.Random(7)
    size = 8 if short else 16
    prompts = nested_prompts(rng, size, size, docs=2, per_doc=2, vocab=(3, 500))
    prompts += [[rng.randrange(3, 500) for _ in range(n)] for n in ((9,) if short else (9, 21))]
    params = [
        SamplingParams(max_tokens=3 if short else 12 + i % 5, temperature=0, n=1 + (i % 3 == 0))
        for i in range(len(prompts))
    ]
    return prompts, params


@pytest.fixture(scope="module")
def expected(moe_models):  # type: ignore[no-untyped-def]
    @cache
    def greedy(family: str, short: bool) -> list[list[int]]:
        prompts, params = workload(short)
        return hf_greedy(moe_models[family], prompts, [p.max_tokens for p in params])

    return greedy


def kv_bytes(family: str, blocks: int) -> int:
    """Bytes of ``blocks`` KV blocks of 8 tokens for the family's tiny model (fp32)."""
    cfg = tiny_config(family)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return blocks * 2 * cfg.num_hidden_layers * 8 * cfg.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(moe_models, expected, family, mode):  # type: ignore[no-untyped-def]
    short = mode == "triton"
    if short and not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    prompts, params = workload(short)
    llm = LLM(
        str(moe_models[family]),
        device="cpu",
        block_size=8,
        # 16 blocks: a few sequences at a time, so decode growth preempts
        kv_cache_memory=kv_bytes(family, 64 if short else 16),
        max_num_batched_tokens=48,
        **MODES[mode],
    )
    outs = llm.generate(prompts, params)
    for out, want, p in zip(outs, expected(family, short), params):
        assert [c.token_ids for c in out.outputs] == [want] * p.n
    stats = llm.engine.stats
    assert stats.groups >= 3  # the system prompt and both documents were shared levels
    assert short or stats.preemptions > 0
    worker = llm.engine.worker
    experts = next(m for m in worker.model.modules() if isinstance(m, SparseMoeBlock)).experts
    if mode == "torch":
        assert experts.kernel is grouped_experts and not isinstance(worker.forward, FusedForward)
    elif mode == "cpu":  # CI has a compiler: the compiled kernels and the fast path
        assert isinstance(experts.kernel, CpuExperts) and isinstance(worker.forward, FusedForward)
        assert isinstance(llm.engine.backend, CpuBackend)
    else:
        assert experts.kernel.__name__ == "triton_experts"
        assert isinstance(llm.engine.backend, TritonBackend)
