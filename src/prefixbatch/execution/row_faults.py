"""Fault isolation for the per-request work of a step: an exception raised while serving one
request (its grammar matcher, penalties, a sampling corner case, log-probabilities, its text)
becomes that request's error, and the other requests of the step go on.

A stage batched over rows runs once for all of them; only when that raises does it run again
row by row, so only the rows that fail on their own are charged with the error and a step
without faults pays nothing. A batched stage must therefore leave no trace when it raises
(compute first, then write), or be idempotent (a grammar mask applied twice is applied once).

Exceptions that are not about one request (out of memory, a device error) are never caught:
they stop the caller (the job writes what is finished and exits).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

# Not one request's fault: the device or the host ran out of memory, or the device failed.
SHARED_FAULTS: tuple[type[BaseException], ...] = (
    MemoryError,
    torch.OutOfMemoryError,
    *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()),
)


def is_request_fault(exc: BaseException) -> bool:
    """Whether ``exc`` may be charged to the request being served when it was raised."""
    return isinstance(exc, Exception) and not isinstance(exc, SHARED_FAULTS)


def describe(stage: str, exc: BaseException) -> str:
    """The error message of a request that failed in ``stage``: the exception's type and
    message (no traceback), e.g. ``"detokenizing: KeyError: 7"``."""
    text = str(exc).strip()
    return f"{stage}: {type(exc).__name__}" + (f": {text}" if text else "")


class Faults(Generic[K]):
    """The errors of one step, by key (a row of the step, or a sequence): ``errors[key]`` is
    the message of the first stage that failed for it."""

    def __init__(self) -> None:
        self.errors: dict[K, str] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.errors

    def fail(self, key: K, message: str) -> None:
        """Record a failure that is not an exception (e.g. a row with no allowed token)."""
        self.errors.setdefault(key, message)

    def live(self, keys: Iterable[K]) -> list[K]:
        """``keys`` without those that already failed, in order."""
        return [k for k in keys if k not in self.errors]

    def guard(self, stage: str, key: K, fn: Callable[..., T], *args: object) -> T | None:
        """``fn(*args)``, or None after recording the request fault it raised for ``key``."""
        try:
            return fn(*args)
        except Exception as exc:
            if not is_request_fault(exc):
                raise
            self.fail(key, describe(stage, exc))
            return None

    def isolate(
        self,
        stage: str,
        keys: Iterable[K],
        batch: Callable[[], None],
        one: Callable[[K], None],
    ) -> None:
        """Run ``batch()`` for the live ``keys`` (it may cover keys that failed before, too);
        when it raises a request fault, run ``one(key)`` for each live key instead, recording
        the keys that raise on their own. Shared faults propagate."""
        live = self.live(keys)
        if not live:
            return
        try:
            batch()
            return
        except Exception as exc:
            if not is_request_fault(exc):
                raise
        for key in live:
            self.guard(stage, key, one, key)
