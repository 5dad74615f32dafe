"""What the engine takes in and hands back, per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .execution.logprobs import TokenLogprob
from .planning.token_arrays import TokenArrays
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    """A tokenized request; ``index`` is its id, unique among the engine's requests (the
    callers use its position in their input order)."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


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
        return Request(
            int(self.ids[position]), self.prompts[position].tolist(), self.params(position)
        )

    def params(self, position: int) -> SamplingParams:
        return self.param_sets[self.param_ids[position]]

    def request_ids(self) -> np.ndarray:
        return self.ids

    def max_tokens(self) -> np.ndarray:
        """(n,) int64 each request's ``max_tokens``."""
        per_set = np.array([p.max_tokens for p in self.param_sets], dtype=np.int64)
        return per_set[self.param_ids]

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


@dataclass(frozen=True)
class ToolCall:
    """A function call in an answer: OpenAI's ``message.tool_calls[i]`` (``arguments``: JSON
    text of an object)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class AssistantMessage:
    """A chat answer as OpenAI's assistant message: ``content`` (the text outside the tool
    calls and the thought; None when there is none), vLLM's ``reasoning_content`` (the
    thought), ``tool_calls``."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        """The ``message`` object of a chat completion choice (``reasoning_content`` and
        ``tool_calls`` only when there are some, as OpenAI leaves ``tool_calls`` out)."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class CompletionOutput:
    """One choice of a request (``SamplingParams.n`` of them). ``logprobs``: one entry per
    output token when the request asked for them, else None. ``message``: a chat answer split
    into content, reasoning and tool calls (``LLM.chat`` sets it; ``finish_reason`` is then
    ``"tool_calls"`` when the answer called tools)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    message: AssistantMessage | None = None


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: its ``outputs`` (choices, in choice order) and, when asked for, the
    prompt's log-probabilities (``prompt_logprobs[0]`` scores prompt token 1: token 0 has
    none). ``text``, ``output_token_ids`` and ``finish_reason`` are choice 0's."""

    index: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    preemptions: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens of all choices (``usage.completion_tokens``)."""
        return sum(len(c.token_ids) for c in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def output_token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason
