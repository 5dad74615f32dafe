"""Penalties, biases and min_p on a step's logits, batched over the rows that use them.

Semantics follow vLLM (``vllm/v1/sample``), in its order:

1. ``min_tokens``: while a request has fewer than ``min_tokens`` output tokens, its stop tokens
   (EOS unless ``ignore_eos``, plus ``stop_token_ids``) get ``-inf``; not on a row whose
   grammar is complete (it allows nothing but a stop token, which then ends the request).
2. ``logit_bias`` (OpenAI): ``logits[token] += bias`` (OpenAI accepts -100..100).
3. ``repetition_penalty`` (vLLM, after CTRL): every token seen in the prompt or the output so far
   has its logit divided by the penalty when positive, multiplied when negative.
4. ``frequency_penalty`` / ``presence_penalty`` (OpenAI): ``logits -= frequency * count +
   presence * (count > 0)`` with ``count`` the token's occurrences in the output only.
5. ``min_p`` (vLLM): tokens whose probability after temperature is below ``min_p`` times the most
   likely token's are masked. ``p >= min_p * p_max`` is ``logit >= max_logit + T * log(min_p)``
   on the unscaled logits, so it is applied here, before the sampler divides by ``T``; greedy rows
   are unaffected (the most likely token always stays) and skipped.

Only the rows that use one of these are gathered, processed with per-row tensors (no Python loop
per row on the device) and written back, so a step where nobody uses them pays nothing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class LogitsParams(Protocol):
    """The request fields read here (``SamplingParams`` has them all)."""

    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: tuple[tuple[int, float], ...]  # (token id, bias) pairs
    min_p: float
    min_tokens: int
    temperature: float
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


def uses_logits_processing(p: LogitsParams) -> bool:
    """Whether a request needs this module at all."""
    return bool(
        p.presence_penalty
        or p.frequency_penalty
        or p.repetition_penalty != 1.0
        or p.logit_bias
        or (p.min_p > 0 and p.temperature > 0)
        or p.min_tokens > 0
    )


def _token_table(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """(R, vocab) fp32 occurrence counts of each row's tokens, from one padded scatter_add."""
    width = max((len(t) for t in token_lists), default=0)
    # Padding goes to an extra column ``vocab_size`` that is dropped afterwards.
    padded = torch.full((len(token_lists), max(width, 1)), vocab_size, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    padded = padded.to(device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # (R, 1)


@dataclass(frozen=True)
class LogitsProcessing:
    """Per-row tensors for the ``R`` rows of a step that use penalties, biases, min_p or
    min_tokens. Build with ``build``; ``apply`` edits the step's (S, vocab) logits in place."""

    rows: torch.Tensor  # (R,) long: positions in the step's logits
    # (K,) long each: sparse (row, token) entries; rows index into ``rows``
    banned_rows: torch.Tensor
    banned_tokens: torch.Tensor
    bias_rows: torch.Tensor
    bias_tokens: torch.Tensor
    bias_values: torch.Tensor  # (K,) fp32
    repetition: torch.Tensor | None  # (R, 1); None when no row uses it
    seen: torch.Tensor | None  # (R, vocab) bool: in the prompt or the output
    frequency: torch.Tensor | None  # (R, 1)
    presence: torch.Tensor | None  # (R, 1)
    output_counts: torch.Tensor | None  # (R, vocab) fp32
    min_p_offset: torch.Tensor | None  # (R, 1): T * log(min_p), -inf where unused

    @classmethod
    def build(
        cls,
        params: Sequence[LogitsParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        eos_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        grammar_done: Collection[int] = (),
    ) -> LogitsProcessing | None:
        """Tensors for one step: ``params``, ``prompts`` and ``outputs`` (tokens so far) are per
        row of the step's logits; ``eos_ids`` are the model's EOS tokens; ``grammar_done``: rows
        whose grammar allows only a stop token (``min_tokens`` does not hold them back). None
        when no row uses any of it. Token ids outside ``vocab_size`` in ``logit_bias`` raise
        ValueError."""
        rows = [i for i, p in enumerate(params) if uses_logits_processing(p)]
        if not rows:
            return None
        ps = [params[i] for i in rows]
        outs = [outputs[i] for i in rows]
        banned = [
            (r, t)
            for r, p in enumerate(ps)
            if len(outs[r]) < p.min_tokens and rows[r] not in grammar_done
            for t in {*(() if p.ignore_eos else eos_ids), *p.stop_token_ids}
            if t < vocab_size
        ]
        bias = [(r, t, v) for r, p in enumerate(ps) for t, v in p.logit_bias]
        if any(not 0 <= t < vocab_size for _, t, _ in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        repetition = seen = frequency = presence = counts = min_p = None
        if any(p.repetition_penalty != 1.0 for p in ps):
            repetition = _column([p.repetition_penalty for p in ps], device)
            prompt_counts = _token_table([prompts[i] for i in rows], vocab_size, device)
            seen = (prompt_counts + _token_table(outs, vocab_size, device)) > 0
        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            frequency = _column([p.frequency_penalty for p in ps], device)
            presence = _column([p.presence_penalty for p in ps], device)
            counts = _token_table(outs, vocab_size, device)
        if any(p.min_p > 0 and p.temperature > 0 for p in ps):
            min_p = _column(
                [
                    p.temperature * math.log(p.min_p)
                    if p.min_p > 0 and p.temperature > 0
                    else -math.inf
                    for p in ps
                ],
                device,
            )

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            rows=longs(rows),
            banned_rows=longs([r for r, _ in banned]),
            banned_tokens=longs([t for _, t in banned]),
            bias_rows=longs([r for r, _, _ in bias]),
            bias_tokens=longs([t for _, t, _ in bias]),
            bias_values=torch.tensor([v for _, _, v in bias], dtype=torch.float32, device=device),
            repetition=repetition,
            seen=seen,
            frequency=frequency,
            presence=presence,
            output_counts=counts,
            min_p_offset=min_p,
        )

    def apply(self, logits: torch.Tensor) -> None:
        """Edit (S, vocab) fp32 ``logits`` in place (only ``rows`` change)."""
        x = logits.index_select(0, self.rows)  # (R, vocab)
        x[self.banned_rows, self.banned_tokens] = float("-inf")
        x.index_put_((self.bias_rows, self.bias_tokens), self.bias_values, accumulate=True)
        if self.repetition is not None and self.seen is not None:
            penalised = torch.where(x > 0, x / self.repetition, x * self.repetition)
            x = torch.where(self.seen, penalised, x)
        if (
            self.output_counts is not None
            and self.frequency is not None
            and self.presence is not None
        ):
            x -= self.frequency * self.output_counts + self.presence * (self.output_counts > 0)
        if self.min_p_offset is not None:
            threshold = x.max(dim=-1, keepdim=True).values + self.min_p_offset
            x = x.masked_fill(x < threshold, float("-inf"))
        logits.index_copy_(0, self.rows, x)
