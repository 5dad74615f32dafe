"""Overlap scheduling (the host schedules and prepares step N+1 before step N's tokens are on the
host; the tokens N+1 needs are read on the device) run on the CPU as the "device", against the
synchronous loop: the same outputs, token for token, for every feature that reads tokens
(stop strings, EOS, penalties, seeded sampling, log-probabilities, n choices whose first token
comes from a shared prefix, prompt scoring, a grammar), and nothing leaks."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from conftest import VOCAB, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.engine import LLMEngine
from prefixbatch.grammar_spec import GrammarSpec
from prefixbatch.outputs import Request, RequestOutput


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)


def batch(seed: int) -> list[Request]:
    rng = random.Random(seed)
    prompts = shared_prefix_prompts(20, seed=seed)
    prompts += [[rng.randrange(3, VOCAB) for _ in range(16)] for _ in range(2)]  # block-aligned
    kinds = [
        dict(temperature=0),
        dict(temperature=0, stop=["w1"], max_tokens=12),  # a stop string in the text
        dict(temperature=0.9, top_p=0.9, top_k=20, frequency_penalty=0.6, presence_penalty=0.3),
        dict(temperature=1.0, repetition_penalty=1.3, logprobs=2, min_tokens=3, max_tokens=9),
        dict(temperature=0.8, n=3, logit_bias={7: 3.0}),
        dict(temperature=0, prompt_logprobs=1, ignore_eos=True),
        dict(temperature=0.7, min_p=0.1, include_stop_str_in_output=True, stop=["w2"]),
    ]
    requests = []
    for i, p in enumerate(prompts):
        kw = {"max_tokens": rng.randrange(1, 10), "seed": i, **kinds[i % len(kinds)]}
        if i == len(prompts) - 1:
            kw["structured"] = GrammarSpec.from_request(guided_choice=["w5w6", "w7", "w8w9w10"])
        requests.append(Request(i, p, SamplingParams(**kw)))
    return requests


def run(engine: LLMEngine, requests: list[Request], abort_at: int | None) -> dict[int, object]:
    engine.add_requests(requests)
    outs: list[RequestOutput] = []
    steps = 0
    while engine.has_unfinished():
        outs += engine.step()
        steps += 1
        if steps == abort_at:
            assert engine.abort(3)  # request 3 runs 9 tokens: unfinished after two steps
        engine.scheduler.check_integrity()
    assert engine.blocks.num_used == 0 and not engine.scheduler.running
    return {
        o.index: (
            [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs],
            o.prompt_logprobs,
        )
        for o in outs
    }


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-lru"])
@pytest.mark.parametrize("abort_at", [None, 2])
def test_overlap_path_equals_the_synchronous_path(llm, policy, abort_at):  # type: ignore[no-untyped-def]
    sync = llm.with_policy(policy).engine
    assert not sync.overlap  # the CPU default
    overlap = LLMEngine(replace(sync.config, overlap_schedule=True), sync.loaded)
    requests = batch(seed=1)
    expected = run(sync, requests, abort_at)
    got = run(overlap, requests, abort_at)
    assert got == expected
    assert (3 in got) == (abort_at is None)
    assert any(choices[0][2] == "stop" for choices, _ in got.values())
    assert overlap.stats.output_tokens == sync.stats.output_tokens
