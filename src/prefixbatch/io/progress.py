"""Progress of a long job: a bar on a terminal, periodic plain log lines otherwise.

The ETA comes from the work the plan left, not from the count of finished requests (under the
plan's order the first requests finish late, and a count-based ETA of a million-request job
reads like weeks at first): the prefill tokens still to compute and the output tokens still
expected (``expected_output_left``), each at its measured cost. The costs come from a
least-squares fit of the compute time so far against the prefill and output tokens done so far
(``time = a * prefill + b * output``), refreshed at every update; until the two can be told
apart (the same mix all along), both cost the same per token.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class PlannedWork:
    prefill_tokens: int  # prompt tokens the run computes (after sharing)
    output_tokens: int  # the most output tokens it can sample (max_tokens * n, summed)


class WorkClock:
    """Fits ``seconds = a * prefill + b * output`` to cumulative samples (through the origin)
    and prices the work left with it."""

    def __init__(self) -> None:
        self._pp = self._oo = self._po = self._tp = self._to = 0.0
        self._last = (0.0, 0.0, 0.0)

    def add(self, seconds: float, prefill: int, output: int) -> None:
        p, o = float(prefill), float(output)
        self._pp, self._oo, self._po = self._pp + p * p, self._oo + o * o, self._po + p * o
        self._tp, self._to = self._tp + seconds * p, self._to + seconds * o
        self._last = (seconds, p, o)

    def seconds(self, prefill: float, output: float) -> float:
        """Estimated time for ``prefill`` and ``output`` more tokens (NaN before any work)."""
        det = self._pp * self._oo - self._po * self._po
        if det > 1e-9 * self._pp * self._oo:
            a = (self._tp * self._oo - self._to * self._po) / det
            b = (self._to * self._pp - self._tp * self._po) / det
            if a >= 0 and b >= 0:
                return a * prefill + b * output
        t, p, o = self._last
        return t / (p + o) * (prefill + output) if p + o else float("nan")


def expected_output_left(
    left: int, budget: float, done: int, finished_tokens: int, running_tokens: int
) -> float:
    """Output tokens the ``left`` unfinished requests are expected to sample still.

    Output lengths are censored observations: ``done`` requests finished with
    ``finished_tokens`` in all, the running ones have sampled ``running_tokens`` so far and go
    on. The mean length is estimated as under an exponential model (the maximum-likelihood
    mean with censoring: every token sampled, finished or not, over the finished requests), so
    long answers still running raise it where the finished requests' plain mean, biased low
    because short answers finish first, would not; memoryless, it is also what each unfinished
    request, running or waiting, is expected to sample from here. It is at most ``budget``,
    the mean ``max_tokens * n``, and the whole is at most the budget the unfinished requests
    have left (all of it when none has finished yet) and at least one token each (none for
    embedding requests, whose budget is 0)."""
    if left <= 0:
        return 0.0
    mean = budget
    if done:
        mean = min(budget, (finished_tokens + running_tokens) / done)
    return max(min(float(left), left * budget), min(left * mean, left * budget - running_tokens))


class Progress:
    """Counts finished requests and generated tokens; ``quiet`` prints nothing.

    ``start`` (``time.monotonic()``, default now) is the job's start: the elapsed clock counts
    from it, as the summary's wall time does; rates and the ETA count from the first compute
    (this object's creation), so model loading does not skew them. ``planned``: the run's work,
    for the ETA (without it the ETA scales the compute time by the requests left). Nothing is
    shown before the work has run ``after_s`` seconds, so a short call stays silent."""

    def __init__(
        self,
        total: int,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = 10.0,
        start: float | None = None,
        planned: PlannedWork | None = None,
        after_s: float = 0.0,
    ) -> None:
        self.total, self.quiet, self.interval, self.planned = total, quiet, interval, planned
        self.after_s = after_s
        self.stream = stream or sys.stderr
        self.done = self.tokens = 0
        self.compute_start = self._last = time.monotonic()
        self.start = self.compute_start if start is None else start
        self.clock = WorkClock()
        self._work = (0, 0)  # (prefill tokens computed, output tokens sampled) so far
        self._bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="req",
                file=self.stream,
                dynamic_ncols=True,
                delay=after_s,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
            self._bar.start_t -= self.compute_start - self.start  # the job's clock (wall time)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.compute_start, 1e-9)

    def eta(self) -> float:
        """Seconds left (NaN while nothing is measured)."""
        if self.done >= self.total:
            return 0.0
        computing = time.monotonic() - self.compute_start
        if self.planned is None:
            return computing / self.done * (self.total - self.done) if self.done else float("nan")
        prefill, sampled = self._work
        left = self.total - self.done
        output_left = expected_output_left(
            left, self.planned.output_tokens / max(1, self.total), self.done, self.tokens,
            max(0, sampled - self.tokens),
        )  # fmt: skip
        prefill_left = max(0, self.planned.prefill_tokens - prefill)
        return self.clock.seconds(prefill_left, output_left)

    def update(
        self, requests: int, tokens: int, note: str = "", work: tuple[int, int] | None = None
    ) -> None:
        """Count finished requests and their tokens; ``note`` (e.g. worker lag) is shown too;
        ``work``: (prefill tokens computed, output tokens sampled) by the run so far."""
        self.done += requests
        self.tokens += tokens
        now = time.monotonic()
        if work is not None:
            self._work = work
            self.clock.add(now - self.compute_start, *work)
        if self.quiet:
            return
        eta = self.eta()
        if self._bar is not None:
            self._bar.update(requests)
            postfix = f"{self.tokens_per_s:.1f} tok/s, eta {eta:.0f}s {note}".rstrip()
            self._bar.set_postfix_str(postfix)
            return
        if now - self.compute_start < self.after_s:
            return
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            print(
                f"[prefixbatch] {self.done}/{self.total} requests, "
                f"{self.tokens_per_s:.1f} tok/s, elapsed {now - self.start:.0f}s, eta {eta:.0f}s"
                + (f", {note}" if note else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
