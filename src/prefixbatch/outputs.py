"""What the engine takes in and hands back, per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen token, its log-probability and the ``k`` most likely tokens,
    most likely first (``top`` holds ``(token_id, logprob)`` pairs); computed by
    ``execution/logprobs.py``."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Request:
    """A tokenized request; ``index`` is its id, unique among the engine's requests (the
    callers use its position in their input order). ``prompt_token_ids``: a list, or an int32
    array (what ``CompactRequests`` hands out and the engine keeps while the request runs)."""

    index: int
    prompt_token_ids: Sequence[int] | np.ndarray
    params: SamplingParams

    def prompt_list(self) -> list[int]:
        """The prompt's token ids as a new list of ints."""
        ids = self.prompt_token_ids
        return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)

    def __eq__(self, other: object) -> bool:
        """Same id, token ids and parameters (a list and an array of the same ids are equal)."""
        if not isinstance(other, Request):
            return NotImplemented
        return (self.index, self.params, self.prompt_list()) == (
            other.index, other.params, other.prompt_list()
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]  # the token ids are mutable


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
    none). ``text``, ``output_token_ids`` and ``finish_reason`` are choice 0's.

    A request that failed while it was served (an exception in its grammar, penalties,
    sampling, log-probabilities or text; see ``execution/row_faults.py``) has ``error`` set to
    what went wrong and no ``outputs``: its ``text`` is empty and its ``finish_reason`` is
    ``"error"``. The other requests of its batch are not affected.

    An embedding request (``SamplingParams.embedding``) has no ``outputs``: its ``embedding``
    is the pooled vector, (dimensions,) float32; a score request's ``score`` is its score
    (``scoring.ScoreConfig.activate``).

    ``cached_tokens``: prompt tokens whose KV was computed before the request needed it (the
    prefix its group shares, computed once for all its members, or prefix-cache hits) and so
    not computed for it; OpenAI's ``usage.prompt_tokens_details.cached_tokens``."""

    index: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    preemptions: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    embedding: np.ndarray | None = None
    score: float | None = None
    cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens of all choices (``usage.completion_tokens``)."""
        return sum(len(c.token_ids) for c in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def output_token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason if self.outputs else "error"
