"""The scheduler driven without a model: fake tokens, invariants checked after every step."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.outputs import Request
from prefixbatch.planning.plan import make_plan
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.block_manager import BlockManager
from prefixbatch.scheduling.request_source import RequestList
from prefixbatch.scheduling.scheduler import Scheduler, SchedulerConfig
from prefixbatch.scheduling.sequence import Sequence, Status
from prefixbatch.scheduling.work import WorkStream

EOS = 0


class Work:
    """A whole batch's sequences at once, with the batch planned first under batchllm (as the
    job does)."""

    def __init__(self, requests: list[Request], policy: str, block_size: int) -> None:
        self.plan = None
        if policy == "batchllm":
            prompts = [r.prompt_token_ids for r in requests]
            self.plan = make_plan(prompts, [r.params.max_tokens for r in requests], block_size)
        stream = WorkStream(RequestList(requests), policy, block_size, seed=0, plan=self.plan)
        self.sequences: list[Sequence] = [s for _, seqs in stream for s in seqs]
        self.groups = [s.leads for s in self.sequences if s.leads is not None]


def work_for(requests: list[Request], policy: str, block_size: int) -> Work:
    return Work(requests, policy, block_size)


def drive(
    prompts, max_tokens, policy, num_blocks, block_size=4, budget=32, seed=0, placeholders=True
):
    """Run to completion with pseudo-random tokens; returns the scheduler and finished seqs.
    ``placeholders``: advance with placeholders, as the overlap loop does (else the tokens are
    appended by ``resolve``, as in the synchronous loop)."""
    rng = random.Random(seed)
    requests = [
        Request(i, p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for i, (p, m) in enumerate(zip(prompts, max_tokens))
    ]
    work = work_for(requests, policy, block_size)
    blocks = BlockManager(num_blocks, block_size, enable_prefix_cache=policy == "fcfs-lru")
    sched = Scheduler(SchedulerConfig(budget, None, 10_000), blocks, (EOS,))
    for s in work.sequences:
        sched.add(s)
    finished, steps = [], 0
    while sched.has_work:
        step = sched.schedule()
        assert step.seqs, "no progress"
        # every scheduled sequence has blocks for all positions it computes this step
        for s, n in zip(step.seqs, step.num_tokens):
            assert len(s.block_table) * block_size >= s.computed + n
            assert s.status is Status.RUNNING
        sched.check_integrity()
        tokens = [rng.randrange(1, 100) for _ in step.samples]
        sched.advance(step, placeholders)
        done = sched.resolve(step, tokens)[0]
        finished += done
        sched.check_integrity()
        steps += 1
        for g in sched.groups:  # a live group's prefix is still referenced
            assert all(blocks.refcount[b] >= 1 for b in g.blocks)
    assert blocks.num_available == num_blocks or policy == "fcfs-lru"
    assert blocks.num_used == 0
    return sched, work, finished


def shared(n_groups, members, prefix_len, seed=0):
    rng = random.Random(seed)
    heads = [[rng.randrange(1, 50) for _ in range(prefix_len)] for _ in range(n_groups)]
    prompts = [
        h + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 9))]
        for h in heads
        for _ in range(members)
    ]
    rng.shuffle(prompts)
    return prompts


def test_every_request_finishes_with_max_tokens():
    prompts = shared(3, 5, 20)
    sched, work, finished = drive(prompts, [6] * len(prompts), "batchllm", num_blocks=64)
    assert sorted(s.seq_id for s in finished) == list(range(len(prompts)))
    assert all(s.num_output == 6 and s.finish_reason == "length" for s in finished)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["batchllm", "fcfs-lru", "fcfs"]))
def test_tokens_appended_at_resolve_equal_placeholders(seed, policy):
    """The synchronous loop's steps (no placeholders: ``resolve`` appends each token) end as
    the overlap loop's (placeholders written over): the same outputs, finishes, preemptions."""
    rng = random.Random(seed)
    prompts = shared(2, 5, 12, seed=seed)
    max_tokens = [rng.randrange(1, 12) for _ in prompts]
    runs = [drive(prompts, max_tokens, policy, 40, seed=seed, placeholders=p) for p in (1, 0)]
    ends = [
        sorted((s.seq_id, s.outputs, s.finish_reason, s.num_prompt) for s in finished)
        for _, _, finished in runs
    ]
    assert ends[0] == ends[1]
    assert len(ends[0]) == len(prompts)
    assert runs[0][0].num_preemptions == runs[1][0].num_preemptions


def test_prefix_blocks_freed_exactly_when_last_member_finishes():
    prompts = shared(1, 4, 16)
    max_tokens = [2, 5, 9, 3]
    requests = [
        Request(i, p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for i, (p, m) in enumerate(zip(prompts, max_tokens))
    ]
    work = work_for(requests, "batchllm", 4)
    assert len(work.groups) == 1
    blocks = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(64), blocks, (EOS,))
    for s in work.sequences:
        sched.add(s)
    group = work.sequences[0].leads
    alive_checks = 0
    while sched.has_work:
        step = sched.schedule()
        done = sched.postprocess(step, [7] * len(step.samples))
        if group.ready:
            prefix_blocks = group.blocks
            if group.remaining > 0:
                assert all(blocks.refcount[b] == 1 for b in prefix_blocks)
                alive_checks += 1
            else:
                assert all(blocks.refcount[b] == 0 for b in prefix_blocks)
                assert group not in sched.groups
        for s in done:
            assert s.group is group
    assert alive_checks >= 8  # the prefix lived across the members' decode steps


def test_prefix_is_prefilled_once_per_group():
    prompts = shared(2, 6, 24)
    sched, work, _ = drive(prompts, [4] * len(prompts), "batchllm", num_blocks=256)
    plan = work.plan
    assert sched.prefill_tokens_computed == plan.computed_prefill_tokens
    assert plan.computed_prefill_tokens < sum(map(len, prompts))


def test_tiny_budget_preempts_and_still_finishes():
    prompts = shared(2, 6, 12, seed=3)
    sched, _, finished = drive(prompts, [20] * len(prompts), "batchllm", num_blocks=16)
    assert len(finished) == len(prompts)
    assert sched.num_preemptions > 0


def test_decode_is_bounded_by_memory_not_request_count():
    prompts = [[i + 1] * 3 for i in range(200)]
    requests = [
        Request(i, p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    work = work_for(requests, "batchllm", 4)
    sched = Scheduler(SchedulerConfig(10_000), BlockManager(1000, 4), (EOS,))
    for s in work.sequences:
        sched.add(s)
    step = sched.schedule()
    sched.postprocess(step, [5] * len(step.samples))
    assert len(sched.schedule().seqs) == 200  # all 200 decode together: no request cap


@settings(max_examples=40, deadline=None)
@given(
    n_groups=st.integers(1, 4),
    members=st.integers(1, 6),
    prefix_len=st.integers(0, 20),
    num_blocks=st.integers(14, 60),
    budget=st.integers(4, 40),
    policy=st.sampled_from(["batchllm", "fcfs", "fcfs-lru"]),
    seed=st.integers(0, 1000),
)
def test_invariants_hold_for_any_budget(
    n_groups, members, prefix_len, num_blocks, budget, policy, seed
):
    prompts = shared(n_groups, members, prefix_len, seed)
    max_tokens = [1 + (i * 5) % 9 for i in range(len(prompts))]
    _, _, finished = drive(prompts, max_tokens, policy, num_blocks, budget=budget, seed=seed)
    assert sorted(s.seq_id for s in finished) == list(range(len(prompts)))
    assert all(
        s.num_output == m for s, m in zip(sorted(finished, key=lambda s: s.seq_id), max_tokens)
    )
