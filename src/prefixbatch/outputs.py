"""What the engine takes in and hands back, per request."""

from __future__ import annotations

from dataclasses import dataclass

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    """A tokenized request; ``index`` is its position in the caller's input order."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class RequestOutput:
    index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finish_reason: str
    preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
