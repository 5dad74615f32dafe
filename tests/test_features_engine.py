"""logprobs, n, penalties and prompt scoring through the whole engine (issue #14), on tiny
random models against transformers' fp32 logits."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from conftest import EOS, VOCAB
from prefixbatch import LLM, SamplingParams


@pytest.fixture(scope="module")
def hf_model(tiny_models):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(len(tokens), vocab) fp32 log_softmax of transformers' logits at every position."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 30))] for _ in range(n)]


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-lru"])
def test_logprobs_are_transformers_log_softmax(llm, hf_model, policy):  # type: ignore[no-untyped-def]
    engine = llm.with_policy(policy)
    batch = prompts(6, seed=3)
    params = [
        SamplingParams(max_tokens=6, temperature=t, seed=i, logprobs=5, prompt_logprobs=3)
        for i, t in enumerate([0, 0.8, 1.0, 0, 0.7, 1.2])
    ]
    for prompt, out in zip(batch, engine.generate(batch, params)):
        tokens = prompt + out.output_token_ids
        ref = hf_logprobs(hf_model, tokens)
        choice = out.outputs[0]
        assert choice.logprobs is not None and len(choice.logprobs) == len(out.output_token_ids)
        for j, entry in enumerate(choice.logprobs):
            row = ref[len(prompt) - 1 + j]
            assert entry.token_id == out.output_token_ids[j]
            assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
            assert [t for t, _ in entry.top] == row.topk(5).indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt) - 1
        for j, entry in enumerate(out.prompt_logprobs):  # scores prompt token j + 1
            assert entry.token_id == prompt[j + 1]
            assert entry.logprob == pytest.approx(ref[j, prompt[j + 1]].item(), abs=1e-4)
            assert [t for t, _ in entry.top] == ref[j].topk(3).indices.tolist()


def test_requests_without_features_return_no_logprobs(llm):  # type: ignore[no-untyped-def]
    out = llm.generate(prompts(1), SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.outputs[0].logprobs is None and out.prompt_logprobs is None
    assert len(out.outputs) == 1


@pytest.mark.parametrize("policy", ["batchllm", "fcfs", "fcfs-lru"])
def test_n_choices_are_seeded_streams_and_the_prompt_is_prefilled_once(llm, policy):  # type: ignore[no-untyped-def]
    engine = llm.with_policy(policy)
    rng = random.Random(7)
    prompt = [rng.randrange(3, VOCAB) for _ in range(32)]  # 4 whole blocks of 8
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=4, ignore_eos=True)
    alone = engine.generate([prompt], seeded)[0]
    assert engine.engine.stats.prefill_tokens_computed == len(prompt)  # once for 4 choices
    choices = [c.token_ids for c in alone.outputs]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    assert len({tuple(c) for c in choices}) == 4  # four different streams
    # Choice 0 is the request's own seed: the same as n=1.
    single = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    assert engine.generate([prompt], single)[0].output_token_ids == choices[0]
    # The same choices whatever else is in the batch, and wherever the request sits in it.
    others = prompts(9, seed=8)
    mixed = [*others[:4], prompt, *others[4:], prompt[:20]]
    params = [SamplingParams(max_tokens=5, temperature=0.9, n=1 + i % 3) for i in range(10)]
    params[4] = seeded
    outs = engine.generate(mixed, [*params, SamplingParams(max_tokens=4, n=2)])
    assert [c.token_ids for c in outs[4].outputs] == choices
    assert [len(o.outputs) for o in outs] == [p.n for p in params] + [2]
    assert engine.engine.stats.output_tokens == sum(o.num_output_tokens for o in outs)
    engine.engine.scheduler.check_integrity()
    assert engine.engine.blocks.num_available == engine.engine.limits.num_blocks


def test_n_with_a_partial_last_block_recomputes_only_the_tail(llm):  # type: ignore[no-untyped-def]
    prompt = prompts(1, seed=9)[0][:21] + [5] * max(0, 21 - len(prompts(1, seed=9)[0]))
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, n=3)
    out = llm.generate([prompt], params)[0]
    assert len(out.outputs) == 3
    # 16 tokens (two blocks) once, then the 5-token tail per choice.
    assert llm.engine.stats.prefill_tokens_computed == 16 + 3 * 5


def reference_greedy(model, prompt: list[int], p: SamplingParams) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy decoding with vLLM's penalty semantics written out one token at a time."""
    out: list[int] = []
    while len(out) < p.max_tokens:
        with torch.inference_mode():
            x = model(torch.tensor([prompt + out])).logits[0, -1].float().tolist()
        counts = Counter(out)
        for t, b in p.logit_bias:
            x[t] += b
        for t in range(VOCAB):
            if t in counts or t in prompt:
                r = p.repetition_penalty
                x[t] = x[t] / r if x[t] > 0 else x[t] * r
            x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
        if len(out) < p.min_tokens:
            x[EOS] = -math.inf
        token = max(range(VOCAB), key=lambda t: x[t])
        out.append(token)
        if token == EOS:
            break
    return out


def test_penalties_match_the_reference_through_the_engine(llm, hf_model):  # type: ignore[no-untyped-def]
    batch = prompts(4, seed=11)
    params = [
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5),
        SamplingParams(max_tokens=10, temperature=0, frequency_penalty=1.5, presence_penalty=1.0),
        SamplingParams(max_tokens=10, temperature=0, logit_bias={7: 5.0, 9: -100}),
        SamplingParams(max_tokens=10, temperature=0),  # a plain row beside them
    ]
    got = [o.output_token_ids for o in llm.generate(batch, params)]
    assert got == [reference_greedy(hf_model, p, sp) for p, sp in zip(batch, params)]
    assert got[0] != reference_greedy(hf_model, batch[0], SamplingParams(max_tokens=10))


def test_cached_tokens_count_the_prompt_read_from_kv_computed_before_it(llm):  # type: ignore[no-untyped-def]
    """``cached_tokens`` (OpenAI's usage.prompt_tokens_details): batchllm's group members read
    their shared prefix, computed once by the group; fcfs-lru's later request reads its cache
    hits; a request that computes its whole prompt reads none."""
    rng = random.Random(5)
    head = [rng.randrange(3, VOCAB) for _ in range(37)]
    batch = [head + [rng.randrange(3, VOCAB) for _ in range(5)] for _ in range(4)]
    lone = [rng.randrange(3, VOCAB) for _ in range(20)]
    params = SamplingParams(max_tokens=3, temperature=0)
    outs = llm.generate([*batch, lone], params)
    whole_blocks = len(head) // 8 * 8  # the prefix a group shares is whole KV blocks
    assert [o.cached_tokens for o in outs] == [whole_blocks] * 4 + [0]
    lru = llm.with_policy("fcfs-lru")
    first, again = (lru.generate([p], params)[0] for p in batch[:2])
    assert (first.cached_tokens, again.cached_tokens) == (0, whole_blocks)
    plain = llm.with_policy("fcfs")
    assert [o.cached_tokens for o in plain.generate(batch, params)] == [0] * 4
