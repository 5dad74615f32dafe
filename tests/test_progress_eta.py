"""The progress ETA on synthetic runs: never 0 while requests remain, falling with the work
done, near the time actually left. A run is simulated step by step on a fake clock: requests
start in file order as slots free up, each step samples one token per running request and
costs its prefill and output tokens, a request ends at its drawn length."""

from __future__ import annotations

import random
import types
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.io import progress as progress_module
from prefixbatch.io.progress import PlannedWork, Progress, expected_output_left

PROMPT = 8  # prompt tokens of every request


def simulate(
    lengths: list[int], slots: int, budget: int
) -> tuple[float, list[tuple[float, float]]]:
    """(the run's duration, (time, ETA) after each finished request)."""
    clock = types.SimpleNamespace(now=0.0)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.now)
    seen = []
    with mock.patch.object(progress_module, "time", fake_time):
        planned = PlannedWork(PROMPT * len(lengths), budget * len(lengths))
        progress = Progress(len(lengths), quiet=True, planned=planned)
        waiting, running, prefill, sampled = list(range(len(lengths))), {}, 0, 0
        while waiting or running:
            started = 0
            while waiting and len(running) < slots:
                running[waiting.pop(0)] = 0
                started += 1
            prefill += PROMPT * started
            clock.now += 0.001 * PROMPT * started + 0.01 * len(running)
            for i in running:
                running[i] += 1
            sampled += len(running)
            for i in [i for i, k in running.items() if k >= lengths[i]]:
                del running[i]
                progress.update(1, lengths[i], work=(prefill, sampled))
                seen.append((clock.now, progress.eta()))
    return clock.now, seen


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64).flatmap(
        lambda b: st.tuples(st.just(b), st.lists(st.integers(1, b), min_size=1, max_size=60))
    ),
    st.integers(1, 16),
)
def test_the_eta_is_positive_while_requests_remain(budget_lengths, slots):  # type: ignore[no-untyped-def]
    budget, lengths = budget_lengths
    _, seen = simulate(lengths, slots, budget)
    assert all(eta > 0 for _, eta in seen[:-1])
    assert seen[-1][1] == 0


def test_the_eta_falls_with_the_work_done_and_tracks_the_time_left():  # type: ignore[no-untyped-def]
    budget, n = 64, 200
    for seed in range(5):
        rng = random.Random(seed)
        draws = {
            "uniform": [rng.randint(1, budget) for _ in range(n)],
            "exponential": [min(budget, 1 + int(rng.expovariate(4 / budget))) for _ in range(n)],
            "short or full": [rng.choice([1 + budget // 10, budget]) for _ in range(n)],
            "full": [budget] * n,
        }
        for kind, lengths in draws.items():
            for slots in (8, 32):
                duration, seen = simulate(lengths, slots, budget)
                quartiles = [seen[n * q // 4 - 1] for q in (1, 2, 3)]
                etas = [eta for _, eta in quartiles]
                assert etas[0] > etas[1] > etas[2] > 0, (kind, slots, etas)
                for t, eta in quartiles:
                    left = duration - t
                    assert left / 3 < eta < 3 * left, (kind, slots, t, eta, left)


def test_running_requests_longer_than_the_finished_ones_keep_the_estimate_up():  # type: ignore[no-untyped-def]
    # 10 short answers (5 tokens) finished; 10 requests running have sampled 50 each and may
    # go to 200: the finished mean (5) minus what they sampled would leave nothing.
    left = expected_output_left(10, 200, 10, 50, 500)
    assert left == 10 * (550 / 10)
    assert expected_output_left(10, 200, 0, 0, 500) == 10 * 200 - 500  # the budget left
    assert expected_output_left(10, 200, 10, 50, 10 * 200) == 10  # at budget: one token each
    assert expected_output_left(5, 0, 5, 0, 0) == 0  # embeddings sample nothing
    assert expected_output_left(0, 200, 20, 500, 0) == 0
