"""Streaming admission: a batch handed to the engine as arrays (``CompactRequests``) becomes
``Request`` and ``Sequence`` objects only as the scheduler's queue needs them. Every request is
answered exactly once with the tokens the whole batch queued at once gives, the groups start in
the plan's order, and the engine holds a window of requests, not the batch."""

from __future__ import annotations

import random

import pytest

from conftest import VOCAB
from prefixbatch.config import EngineConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.outputs import Request
from prefixbatch.planning.groups import Group
from prefixbatch.planning.plan import Plan, make_plan
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.admission import AdmissionWindow
from prefixbatch.scheduling.request_source import CompactRequests

BLOCK = 8


@pytest.fixture(scope="module")
def engine(tiny_models) -> LLMEngine:  # type: ignore[no-untyped-def]
    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=BLOCK, kv_cache_memory=2**20
    )
    return LLMEngine(config)


def batch(seed: int = 0) -> list[Request]:
    """Three system prompts > two documents each > questions, shuffled; some requests are
    exactly a level's prefix, some want two choices, one scores its prompt."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    prompts = []
    for _ in range(3):
        system = tokens(3 * BLOCK)
        for _ in range(2):
            doc = system + tokens(2 * BLOCK)
            prompts += [doc + tokens(rng.randrange(1, 12)) for _ in range(5)] + [doc]
    prompts += [tokens(rng.randrange(5, 20)) for _ in range(4)]  # shares nothing
    rng.shuffle(prompts)
    out = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=2 + i % 5, temperature=0, ignore_eos=True)
        if i % 7 == 3:
            params = SamplingParams(max_tokens=3, temperature=0.8, seed=i, n=2)
        if i == 5:
            params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
        out.append(Request(i, p, params))
    return out


def run(engine: LLMEngine, requests: list[Request], plan: Plan, window: AdmissionWindow):  # type: ignore[no-untyped-def]
    """Outputs by request, the prefixes of the levels in the order they started, and the most
    requests the engine held at once."""
    engine.admission = window
    started: list[tuple[int, ...]] = []
    seen: set[int] = set()
    held = 0
    schedule = engine.scheduler.schedule

    def spy():  # type: ignore[no-untyped-def]
        nonlocal held
        held = max(held, len(engine._requests))
        step = schedule()
        for seq in step.seqs:
            if seq.leads is not None and id(seq.leads) not in seen:
                seen.add(id(seq.leads))
                started.append(tuple(seq.leads.tokens))
        return step

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    try:
        outs: dict[int, list] = {}  # type: ignore[type-arg]
        for out in engine.generate(CompactRequests.of(requests), plan):
            assert out.index not in outs  # answered once
            outs[out.index] = [c.token_ids for c in out.outputs]
    finally:
        del engine.scheduler.schedule
    assert engine.blocks.num_used == 0
    return outs, started, held


def plan_order(plan: Plan, requests: list[Request]) -> list[tuple[int, ...]]:
    """The levels' prefixes, depth first in the plan's order."""
    out: list[tuple[int, ...]] = []

    def walk(level: Group) -> None:
        for item in plan.in_order(level):
            if isinstance(item, Group):
                out.append(tuple(requests[item.first].prompt_token_ids[: item.prefix_len]))
                walk(item)

    walk(plan.root)
    return out


def test_streaming_answers_each_request_once_in_the_plans_order(engine):  # type: ignore[no-untyped-def]
    requests = batch()
    scoring = {r.index for r in requests if r.params.prompt_logprobs is not None}
    planned = [r for r in requests if r.index not in scoring]
    plan = make_plan(
        [r.prompt_token_ids for r in requests], [r.params.max_tokens for r in requests], BLOCK
    )
    whole, whole_started, whole_held = run(engine, requests, plan, AdmissionWindow(10**9, 10**9))
    small, small_started, small_held = run(engine, requests, plan, AdmissionWindow(2, 6))
    assert sorted(small) == sorted(whole) == [r.index for r in requests]
    assert small == whole  # the same tokens (greedy, or seeded)
    assert whole_held == len(requests)  # everything at once
    assert small_held <= len(requests) // 3  # a window (and what runs), not the batch
    # The groups start in the plan's order (depth first), choice levels of n > 1 aside; the
    # engine plans without the request that scores its prompt (it runs outside every level).
    keep = [i for i, r in enumerate(requests) if r.index not in scoring]
    expected = plan_order(plan.subset(keep), planned)
    assert [p for p in small_started if p in set(expected)] == expected
    top = {
        tuple(r.prompt_token_ids[: g.prefix_len])
        for g in plan.root.children
        for r in [requests[g.first]]
    }
    assert [p for p in whole_started if p in top] == [p for p in small_started if p in top]


def test_aborting_a_request_before_its_turn(engine):  # type: ignore[no-untyped-def]
    requests = batch(seed=1)[:20]
    plan = make_plan(
        [r.prompt_token_ids for r in requests], [r.params.max_tokens for r in requests], BLOCK
    )
    engine.admission = AdmissionWindow(1, 2)
    engine.add_requests(CompactRequests.of(requests), plan)
    late = [i for i in range(20) if i not in engine._requests]
    assert late and engine.abort(late[0]) and not engine.abort(late[0])
    outs = []
    while engine.has_unfinished():
        outs += [o.index for o in engine.step()]
    assert sorted(outs) == [i for i in range(20) if i != late[0]]
    assert engine.blocks.num_used == 0
