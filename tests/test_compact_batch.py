"""The compact forms of a batch: token arrays (built across pages, subsets as views, copies to
ship), requests as arrays with each parameter set once, the job's store of every request, and
the progress ETA from planned work."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.io.batch_file import parse_line
from prefixbatch.io.progress import PlannedWork, Progress, WorkClock
from prefixbatch.io.results import record_key
from prefixbatch.jobs.batch_store import BatchStore
from prefixbatch.jobs.job import JobSummary
from prefixbatch.outputs import Request
from prefixbatch.planning import token_arrays
from prefixbatch.planning.plan import make_plan
from prefixbatch.planning.token_arrays import TokenArrays
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.request_source import CompactRequests, RequestList
from prefixbatch.scheduling.work import WorkStream

prompts = st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=20), max_size=30)


@settings(max_examples=100, deadline=None)
@given(batch=prompts, data=st.data())
def test_token_arrays_hold_the_prompts(batch, data):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(token_arrays, "_PAGE", 7)  # prompts straddle pages
        arrays = TokenArrays.from_lists(batch)
    assert [arrays[i].tolist() for i in range(len(arrays))] == batch
    assert arrays.lengths.tolist() == [len(p) for p in batch]
    pick = data.draw(st.lists(st.integers(0, max(0, len(batch) - 1)), max_size=10))
    pick = pick if batch else []
    for sub in (arrays.select(pick), arrays.take(pick)):
        assert [sub[i].tolist() for i in range(len(sub))] == [batch[i] for i in pick]
    assert arrays.select(pick).ids is arrays.ids  # a view
    assert len(arrays.take(pick).ids) == sum(len(batch[i]) for i in pick)  # its own


def test_compact_requests_keep_each_parameter_set_once():  # type: ignore[no-untyped-def]
    greedy, sampled = SamplingParams(max_tokens=4, temperature=0), SamplingParams(max_tokens=9)
    requests = [Request(10 + i, [i + 1] * (i + 1), [greedy, sampled][i % 2]) for i in range(6)]
    compact = CompactRequests.of(requests)
    assert compact.param_sets == (greedy, sampled)
    assert [compact.request(i) for i in range(6)] == requests
    assert compact.max_tokens().tolist() == [4, 9, 4, 9, 4, 9]
    part = compact.take([5, 3])
    assert part.param_sets == (sampled,)  # only the sets it uses travel
    assert [part.request(i) for i in range(2)] == [requests[5], requests[3]]


def test_both_request_sources_answer_the_engine_alike():  # type: ignore[no-untyped-def]
    """What the engine reads of a batch before making its requests (the planner's prompts and
    budgets, the parameter sets in use) is the same from a list and from arrays."""
    sets = [SamplingParams(max_tokens=n) for n in (3, 5, 7)]
    requests = [Request(i, [i + 2] * (i % 4 + 1), sets[2 * (i % 3 // 2)]) for i in range(7)]
    listed, compact = RequestList(requests), CompactRequests.of(requests)
    extra = (*compact.param_sets, sets[1])  # a set no request uses
    by_hand = CompactRequests(compact.prompts, extra, compact.param_ids, compact.ids)
    for source in (listed, compact, by_hand):
        assert [list(p) for p in source.prompt_tokens()] == [r.prompt_token_ids for r in requests]
        assert source.max_tokens().tolist() == [r.params.max_tokens for r in requests]
        assert source.distinct_params() == [sets[0], sets[2]]  # sets[1]: in no request


def test_the_store_rebuilds_what_a_record_needs():  # type: ignore[no-untyped-def]
    lines = [
        '{"custom_id": "a", "prompt": "w5 w6", "echo": true, "max_tokens": 3}',
        '{"custom_id": "b\\u00e9", "messages": [{"role": "user", "content": "w7"}]}',
        '{"custom_id": "c", "prompt": [5, 6], "max_tokens": 3}',
    ]
    seen: set[str] = set()
    parsed = [parse_line(text, i + 1, seen) for i, text in enumerate(lines)]
    store = BatchStore()
    for k, req in enumerate(parsed):
        key = record_key(req.custom_id, req.request_hash)
        store.add(req, key, None if k == 1 else np.array([5, 6, k], np.int32))  # b: answered
    store.freeze()
    for k, req in enumerate(parsed):
        info = store.info(k)
        assert (info.line, info.custom_id, info.url, info.params) == (
            req.line,
            req.custom_id,
            req.url,
            req.params,
        )
        assert (info.request_hash, info.echo) == (req.request_hash, req.echo)
    assert store.info(0).prompt == "w5 w6"  # echoed as sent
    runnable = store.runnable()
    assert runnable.ids.tolist() == [0, 2]  # request id = the store's index
    assert runnable.request(1).prompt_list() == [5, 6, 2]


def test_work_clock_prices_prefill_and_output_apart():  # type: ignore[no-untyped-def]
    clock = WorkClock()
    for prefill, output in [(1000, 0), (1500, 40), (1800, 200), (2000, 600)]:
        clock.add(0.002 * prefill + 0.02 * output, prefill, output)
    assert abs(clock.seconds(500, 100) - (0.002 * 500 + 0.02 * 100)) < 1e-6
    same_mix = WorkClock()  # prefill and output always 10:1: one rate for both
    for k in range(1, 4):
        same_mix.add(1.1 * k, 10 * k, k)
    assert abs(same_mix.seconds(20, 2) - 2.2) < 1e-9


def test_eta_comes_from_planned_work_not_from_finished_requests():  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    planned = PlannedWork(prefill_tokens=10_000, output_tokens=1_000)
    progress = Progress(100, stream=stream, interval=0.0, planned=planned)
    progress.compute_start -= 10.0  # 10 s of compute so far
    # One request finished (few tokens), but 90% of the planned prefill is done: far from the
    # count-based 990 s.
    progress.update(1, 10, work=(9_000, 100))
    eta = progress.eta()
    assert 0 < eta < 100
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("[prefixbatch] 1/100 requests") and f"eta {eta:.0f}s" in line


def test_summary_tokens_per_second_leave_out_start_up():  # type: ignore[no-untyped-def]
    summary = JobSummary(3, 0, 0, 30, 200, 0, 0, wall_s=100.0, compute_s=10.0)
    assert "wall time: 100.0s, of which computing 10.0s: 20.0 output tok/s" in summary.lines()
    prefill_only = JobSummary(3, 0, 0, 300, 0, 0, 0, wall_s=100.0, compute_s=10.0)  # embeddings
    assert "wall time: 100.0s, of which computing 10.0s: 30.0 prompt tok/s" in prefill_only.lines()
    resumed_done = JobSummary(0, 0, 40, 0, 0, 0, 0, wall_s=2.0, compute_s=0.0)  # all answered
    assert "wall time: 2.0s, of which computing 0.0s (nothing computed)" in resumed_done.lines()


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-lru"])
def test_running_requests_view_the_batch_arrays(policy):  # type: ignore[no-untyped-def]
    """The requests made from a batch's arrays, their sequences and their levels (the shared
    prefix's, and the prompt of a request with n = 2 choices) hold read-only int32 views of
    those arrays: no token is copied, no int object made per token."""
    rng = random.Random(0)
    shared = [rng.randrange(1, 500) for _ in range(40)]
    prompts = [shared + [rng.randrange(1, 500) for _ in range(5 + i)] for i in range(6)]
    params = [SamplingParams(max_tokens=3, temperature=0, n=1 + i % 2) for i in range(6)]
    compact = CompactRequests.of([Request(i, p, params[i]) for i, p in enumerate(prompts)])
    plan = make_plan(compact.prompts, compact.max_tokens(), 8) if policy == "batchllm" else None
    held: list[np.ndarray] = []
    levels: list[np.ndarray] = []
    for admitted, seqs in WorkStream(compact, policy, 8, 0, plan):
        for _, r in admitted:
            assert r.prompt_list() == prompts[r.index]
            held.append(r.prompt_token_ids)
        held += [s.prompt for s in seqs]
        levels += [s.leads.tokens for s in seqs if s.leads is not None]
    above = len(shared) if policy == "batchllm" else 0  # a choice level below the shared one
    choice_levels = [p[: len(p) // 8 * 8] for i, p in enumerate(prompts) if i % 2]
    expected = [c for c in choice_levels if len(c) > above] + ([shared] if above else [])
    assert sorted(t.tolist() for t in levels) == sorted(expected)
    for tokens in held + levels:
        assert tokens.dtype == np.int32 and not tokens.flags.writeable
        assert np.shares_memory(tokens, compact.prompts.ids)
