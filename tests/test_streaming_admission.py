"""Streaming admission: a batch handed to the engine as arrays (``CompactRequests``) becomes
``Request`` and ``Sequence`` objects only as the scheduler's queue needs them. Every request is
answered exactly once with the tokens the whole batch queued at once gives, the groups start in
the plan's order, and the engine holds a window of requests, not the batch; without a model,
the same for random batches, windows, KV pools and token budgets."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VOCAB
from prefixbatch.config import EngineConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.outputs import Request
from prefixbatch.planning.groups import Group
from prefixbatch.planning.plan import Plan, make_plan
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.admission import AdmissionWindow, PendingBatches
from prefixbatch.scheduling.block_manager import BlockManager
from prefixbatch.scheduling.request_source import CompactRequests, RequestList
from prefixbatch.scheduling.scheduler import Scheduler, SchedulerConfig
from prefixbatch.scheduling.work import WorkStream

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
            if seq.leads is not None and seq.leads.group_id not in seen:
                seen.add(seq.leads.group_id)
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


def _nested_batch(rng: random.Random, groups: int, docs: int, members: int) -> list[list[int]]:
    out = []
    for _ in range(groups):
        system = [rng.randrange(3, 60) for _ in range(2 * BLOCK)]
        for _ in range(docs):
            doc = system + [rng.randrange(3, 60) for _ in range(BLOCK)]
            out += [
                doc + [rng.randrange(3, 60) for _ in range(rng.randrange(0, 5))]
                for _ in range(members)
            ]
    out += [
        [rng.randrange(3, 60) for _ in range(rng.randrange(1, 9))]
        for _ in range(rng.randrange(0, 4))
    ]
    rng.shuffle(out)
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
    window=st.tuples(st.integers(1, 6), st.integers(1, 12)),
    num_blocks=st.integers(24, 80),
    budget=st.integers(8, 64),
)
def test_any_window_answers_each_request_once_and_keeps_the_groups_order(  # type: ignore[no-untyped-def]
    seed, shape, window, num_blocks, budget
):
    """Without a model: the scheduler fed through the admission window, fake tokens. Every
    request finishes once, with its max_tokens; every level's sub-levels (and the top levels)
    start in the plan's order, whatever the window."""
    rng = random.Random(seed)
    prompts = _nested_batch(rng, *shape)
    requests = [
        Request(i, p, SamplingParams(max_tokens=1 + i % 4, temperature=0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    plan = make_plan(prompts, [r.params.max_tokens for r in requests], BLOCK)
    pending = PendingBatches()
    pending.add(
        np.arange(len(requests)),
        iter(WorkStream(RequestList(requests), "batchllm", BLOCK, 0, plan)),
    )
    blocks = BlockManager(num_blocks, BLOCK)
    sched = Scheduler(SchedulerConfig(budget, None, 10_000), blocks, (0,))
    admitted = AdmissionWindow(*window)
    started: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (parent prefix, prefix)
    seen: set[int] = set()
    finished: list[int] = []
    while True:
        for _, seqs in pending.take(sched, admitted):
            for s in seqs:
                sched.add(s)
        if not sched.has_work:
            break
        step = sched.schedule()
        assert step.seqs, "no progress"
        for s in step.seqs:
            if s.leads is not None and s.leads.group_id not in seen:
                seen.add(s.leads.group_id)
                parent = tuple(s.leads.parent.tokens) if s.leads.parent else ()
                started.append((parent, tuple(s.leads.tokens)))
        finished += [
            s.seq_id for s in sched.postprocess(step, [rng.randrange(1, 60) for _ in step.samples])
        ]
        sched.check_integrity()
    assert sorted(finished) == list(range(len(requests)))  # each once
    assert blocks.num_used == 0
    expected: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def walk(level: Group, prefix: tuple[int, ...]) -> None:
        for item in plan.in_order(level):
            if isinstance(item, Group):
                mine = tuple(prompts[item.first][: item.prefix_len])
                expected.append((prefix, mine))
                walk(item, mine)

    walk(plan.root, ())
    for parent in {p for p, _ in expected}:
        assert [c for p, c in started if p == parent] == [c for p, c in expected if p == parent]
