"""Streaming admission: how far ahead of the scheduler an engine turns its batches into
sequences.

A batch is walked in the plan's order (``work.WorkStream``) only as far as the scheduler's queue
needs: before each step the engine tops the queue up to ``AdmissionWindow.waiting`` sequences
ready to be admitted, holding at most ``AdmissionWindow.queued`` not yet admitted (those include
the members parked behind a level whose prefix is not computed yet). A step admits at most
``max_num_batched_tokens`` sequences that compute a token, so a window of twice that leaves
admission as it would be with the whole batch queued; the one difference is that a level starts
when its queued members (not all of a level larger than the window) fit beside what runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .scheduler import Scheduler
from .work import Admission


@dataclass
class AdmissionWindow:
    """``waiting``: admissible sequences to keep queued; ``queued``: the most not admitted."""

    waiting: int
    queued: int

    @classmethod
    def for_budget(cls, max_num_batched_tokens: int) -> AdmissionWindow:
        return cls(2 * max_num_batched_tokens, max(8 * max_num_batched_tokens, 4096))


@dataclass
class _Batch:
    ids: np.ndarray  # (n,) request ids by position
    made: np.ndarray  # (n,) bool: the request's sequences exist
    items: Iterator[Admission]


class PendingBatches:
    """The batches added to an engine and not yet fully handed to its scheduler."""

    def __init__(self) -> None:
        self._batches: list[_Batch] = []

    def __bool__(self) -> bool:
        return bool(self._batches)

    def add(self, ids: np.ndarray, items: Iterator[Admission]) -> None:
        self._batches.append(_Batch(ids, np.zeros(len(ids), dtype=bool), items))

    def waiting_ids(self) -> np.ndarray:
        """Ids of the requests whose sequences are not made yet."""
        return np.concatenate([np.zeros(0, np.int64), *(b.ids[~b.made] for b in self._batches)])

    def holds(self, request_id: int) -> bool:
        """Whether ``request_id``'s sequences are still to be made."""
        return any(bool(np.any((b.ids == request_id) & ~b.made)) for b in self._batches)

    def clear(self) -> None:
        self._batches.clear()

    def take(self, scheduler: Scheduler, window: AdmissionWindow) -> Iterator[Admission]:
        """The next admissions, while the caller adds them to ``scheduler`` and it is short of
        the window."""
        queued = scheduler.num_queued
        while self._batches and len(scheduler.waiting) < window.waiting and queued < window.queued:
            batch = self._batches[0]
            item = next(batch.items, None)
            if item is None:
                self._batches.pop(0)
                continue
            for position, _ in item[0]:
                batch.made[position] = True
            yield item
            queued += len(item[1])
