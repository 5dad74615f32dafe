"""Where the engine takes a batch's requests from: requests that exist already, or arrays from
which each ``Request`` is made when the engine schedules it (``CompactRequests``), so a batch of
millions holds thousands of request objects at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..outputs import Request
from ..planning.token_arrays import TokenArrays
from ..sampling_params import SamplingParams


@runtime_checkable
class RequestSource(Protocol):
    """A batch whose ``Request`` objects are made on demand, by position ``0..len - 1``: the
    engine makes each one when the request is about to be scheduled and drops it when it ends,
    so a batch of millions holds thousands of them at a time (``jobs/batch_store.py``)."""

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray:
        """(len,) int64 prompt lengths, by position."""
        ...

    def request(self, position: int) -> Request: ...

    def params(self, position: int) -> SamplingParams:
        """The request's parameters, without making the request."""
        ...

    def request_ids(self) -> np.ndarray:
        """(len,) int64 ``Request.index`` of every position."""
        ...

    def prompt_tokens(self) -> TokenArrays | Sequence[Sequence[int]]:
        """Every prompt by position, as the planner takes them (``make_plan``)."""
        ...

    def max_tokens(self) -> np.ndarray:
        """(len,) int64 each request's ``max_tokens``."""
        ...

    def distinct_params(self) -> list[SamplingParams]:
        """The parameter sets the batch uses, each once."""
        ...


@dataclass(frozen=True)
class RequestList:
    """A ``RequestSource`` over requests that exist already."""

    requests: Sequence[Request]
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        lengths = np.fromiter((len(r.prompt_token_ids) for r in self.requests), np.int64)
        object.__setattr__(self, "lengths", lengths)

    def __len__(self) -> int:
        return len(self.requests)

    def request(self, position: int) -> Request:
        return self.requests[position]

    def params(self, position: int) -> SamplingParams:
        return self.requests[position].params

    def request_ids(self) -> np.ndarray:
        return np.fromiter((r.index for r in self.requests), np.int64, len(self.requests))

    def prompt_tokens(self) -> Sequence[Sequence[int]]:
        return [r.prompt_token_ids for r in self.requests]

    def max_tokens(self) -> np.ndarray:
        return np.fromiter((r.params.max_tokens for r in self.requests), np.int64, len(self))

    def distinct_params(self) -> list[SamplingParams]:
        return list(dict.fromkeys(r.params for r in self.requests))


@dataclass(frozen=True, eq=False)
class CompactRequests:
    """A ``RequestSource`` held as arrays: the prompts as ``TokenArrays``, each distinct
    ``SamplingParams`` once (``param_sets``, picked by ``param_ids``: (n,) int32), and the
    request ids ((n,) int64)."""

    prompts: TokenArrays
    param_sets: tuple[SamplingParams, ...]
    param_ids: np.ndarray
    ids: np.ndarray

    @classmethod
    def of(cls, requests: Sequence[Request]) -> CompactRequests:
        """Existing requests as arrays (parameters compared by value)."""
        sets: dict[SamplingParams, int] = {}
        param_ids = [sets.setdefault(r.params, len(sets)) for r in requests]
        return cls(
            TokenArrays.from_lists(r.prompt_token_ids for r in requests),
            tuple(sets),
            np.asarray(param_ids, dtype=np.int32),
            np.fromiter((r.index for r in requests), np.int64, len(requests)),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.prompts.lengths

    def request(self, position: int) -> Request:
        """The request, its prompt an int32 view of ``prompts`` (no copy)."""
        return Request(int(self.ids[position]), self.prompts[position], self.params(position))

    def params(self, position: int) -> SamplingParams:
        return self.param_sets[self.param_ids[position]]

    def request_ids(self) -> np.ndarray:
        return self.ids

    def prompt_tokens(self) -> TokenArrays:
        return self.prompts

    def max_tokens(self) -> np.ndarray:
        per_set = np.array([p.max_tokens for p in self.param_sets], dtype=np.int64)
        return per_set[self.param_ids]

    def distinct_params(self) -> list[SamplingParams]:
        """The sets some request uses (``take`` keeps only those; a batch built by hand may
        hold others)."""
        return [self.param_sets[i] for i in np.unique(self.param_ids).tolist()]

    def take(self, positions: Sequence[int] | np.ndarray) -> CompactRequests:
        """The requests at ``positions`` (ids kept), in arrays of their own: what a worker is
        shipped."""
        idx = np.asarray(positions, dtype=np.int64)
        used, param_ids = np.unique(self.param_ids[idx], return_inverse=True)
        return CompactRequests(
            self.prompts.take(idx),
            tuple(self.param_sets[i] for i in used.tolist()),
            param_ids.astype(np.int32),
            self.ids[idx],
        )
