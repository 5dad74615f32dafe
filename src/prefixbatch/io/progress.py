"""Progress of a long job: a bar on a terminal, periodic plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts finished requests and generated tokens; ``quiet`` prints nothing.

    ``start`` (``time.monotonic()``, default now) is the job's start: the elapsed clock counts
    from it, as the summary's wall time does; rates and the ETA count from the first compute
    (this object's creation), so model loading does not skew them. Nothing is shown before the
    work has run ``after_s`` seconds, so a short call stays silent."""

    def __init__(
        self,
        total: int,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float = 10.0,
        start: float | None = None,
        after_s: float = 0.0,
    ) -> None:
        self.total, self.quiet, self.interval, self.after_s = total, quiet, interval, after_s
        self.stream = stream or sys.stderr
        self.done = self.tokens = 0
        self.compute_start = self._last = time.monotonic()
        self.start = self.compute_start if start is None else start
        self._bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="req", file=self.stream, dynamic_ncols=True, delay=after_s
            )
            self._bar.start_t -= self.compute_start - self.start  # the job's clock (wall time)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.compute_start, 1e-9)

    def update(self, requests: int, tokens: int, note: str = "") -> None:
        """Count finished requests and their tokens; ``note`` (e.g. worker lag) is shown too."""
        self.done += requests
        self.tokens += tokens
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(requests)
            self._bar.set_postfix_str(f"{self.tokens_per_s:.1f} tok/s {note}".rstrip())
            return
        now = time.monotonic()
        if now - self.compute_start < self.after_s:
            return
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            elapsed = now - self.start
            computing = now - self.compute_start
            eta = computing / self.done * (self.total - self.done) if self.done else float("nan")
            print(
                f"[prefixbatch] {self.done}/{self.total} requests, "
                f"{self.tokens_per_s:.1f} tok/s, elapsed {elapsed:.0f}s, eta {eta:.0f}s"
                + (f", {note}" if note else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
