"""Penalties, biases and min_p on a step's logits, batched over the rows that use them.

Semantics follow vLLM (``vllm/v1/sample``), in its order:

1. ``min_tokens``: while a request has fewer than ``min_tokens`` output tokens, its stop tokens
   (EOS unless ``ignore_eos``, plus ``stop_token_ids``) get ``-inf``.
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
per row on the device) and written back, so a step where nobody uses them pays nothing. The
token counts the penalties read are kept across steps (``PenaltyState``): made once when a
sequence first samples, then advanced on the device by each step's sampled tokens, so no step
reads a sequence's prompt or output tokens on the host (SGLang's penalizers keep such running
state too).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from weakref import WeakKeyDictionary

import numpy as np
import torch

from .upload import Staged, upload


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


def token_counts(
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


class PenalisedSequence(Protocol):
    """What is read from a sequence (``scheduling.sequence.Sequence`` has it)."""

    params: LogitsParams
    prompt: np.ndarray  # (num_prompt,) int32
    outputs: list[int]
    num_prompt: int

    @property
    def num_output(self) -> int: ...


def uses_token_counts(p: LogitsParams) -> bool:
    """Whether a request's penalties read token counts (repetition, frequency, presence)."""
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


class PenaltyState:
    """Per sequence that uses repetition, frequency or presence penalties: its output tokens'
    counts and its prompt's token set, one row each of ``counts`` (rows, vocab) fp32 and
    ``prompt`` (rows, vocab) bool on ``device``. A row is filled from the sequence's tokens when
    it first samples (``stage``) and advanced with each token it samples (``record``, on the
    device); it goes back when the sequence is dropped. Row 0 stays empty: rows of a step that
    use other processing only read it."""

    def __init__(self, vocab_size: int, device: torch.device, rows: int = 16) -> None:
        self.vocab_size = vocab_size
        self.counts = torch.zeros(rows, vocab_size, device=device)
        self.prompt = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self._rows: WeakKeyDictionary[PenalisedSequence, int] = WeakKeyDictionary()
        self._free = list(range(rows - 1, 0, -1))

    def rows(self, seqs: Sequence[PenalisedSequence]) -> tuple[list[int], dict[str, np.ndarray]]:
        """The state row of each of ``seqs`` (which all use token counts), and the host arrays
        that fill the rows new in this step (``fill`` reads them): their ids, then (row,
        token) pairs of their prompts and of their outputs so far."""
        rows, new = [], []
        for seq in seqs:
            row = self._rows.get(seq)
            if row is None:
                row = self._take()
                self._rows[seq] = row
                weakref.finalize(seq, self._free.append, row)  # back when the sequence goes
                new.append((row, seq))
            rows.append(row)
        if not new:
            return rows, {}

        def pairs(parts: list[tuple[int, Sequence[int]]]) -> np.ndarray:
            ids = [np.full(len(tokens), row, dtype=np.int64) for row, tokens in parts]
            toks = [np.asarray(tokens, dtype=np.int64) for _, tokens in parts]
            return np.stack([np.concatenate([np.zeros(0, np.int64), *ids]),
                             np.concatenate([np.zeros(0, np.int64), *toks])])  # fmt: skip

        return rows, {
            "new": np.array([row for row, _ in new], dtype=np.int64),
            "prompt": pairs([(row, s.prompt) for row, s in new]),
            "output": pairs([(row, s.outputs) for row, s in new]),
        }

    def fill(self, t: dict[str, torch.Tensor]) -> None:
        """Fill the new rows from ``rows``' arrays on the device (nothing when none is new)."""
        if "new" not in t:
            return
        self.counts.index_fill_(0, t["new"], 0.0)
        self.prompt.index_fill_(0, t["new"], False)
        prompt, output = t["prompt"], t["output"]
        self.prompt[prompt[0], prompt[1]] = True
        ones = torch.ones(output.shape[1], device=self.counts.device)
        self.counts.index_put_((output[0], output[1]), ones, accumulate=True)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one sampled token per row: ``rows`` (K,) state rows, ``tokens`` (K,) on the
        device (never read on the host)."""
        ones = torch.ones(rows.shape[0], device=self.counts.device)
        self.counts.index_put_((rows, tokens), ones, accumulate=True)

    def _take(self) -> int:
        if not self._free:
            grown = len(self.counts)
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
            self._free.extend(range(2 * grown - 1, grown - 1, -1))  # in place: see ``rows``
        return self._free.pop()


def _column(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)[:, None]  # (R, 1)


@dataclass(frozen=True)
class LogitsProcessing:
    """Per-row tensors for the ``R`` rows of a step that use penalties, biases, min_p or
    min_tokens. Make with ``stage`` (or ``build``); ``apply`` edits the step's (S, vocab) logits
    in place."""

    rows: torch.Tensor  # (R,) long: positions in the step's logits
    # (K,) long each: sparse (row, token) entries; rows index into ``rows``
    banned_rows: torch.Tensor
    banned_tokens: torch.Tensor
    bias_rows: torch.Tensor
    bias_tokens: torch.Tensor
    bias_values: torch.Tensor  # (K,) fp32
    state: PenaltyState
    state_rows: torch.Tensor  # (R,) long: each row's ``PenaltyState`` row (0: none)
    counted_rows: torch.Tensor  # (C,) long: the step's rows whose tokens ``record`` counts
    counted_state: torch.Tensor  # (C,) long: their ``PenaltyState`` rows
    repetition: torch.Tensor | None  # (R, 1); None when no row uses it
    frequency: torch.Tensor | None  # (R, 1)
    presence: torch.Tensor | None  # (R, 1)
    min_p_offset: torch.Tensor | None  # (R, 1): T * log(min_p), -inf where unused

    @classmethod
    def stage(
        cls,
        seqs: Sequence[PenalisedSequence],
        state: PenaltyState,
        eos_ids: Sequence[int],
        rows: Sequence[int] | None = None,
    ) -> Staged[LogitsProcessing] | None:
        """Host arrays for the rows ``rows`` of a step (default: every row that uses any of
        this module; ``seqs`` holds every row's sequence, its tokens so far); None when there
        is none. New sequences that use token counts get their ``state`` rows here (filled on
        the device when the metadata is built). Token ids outside the vocabulary in
        ``logit_bias`` raise ValueError."""
        vocab_size = state.vocab_size
        if rows is None:
            rows = [i for i, s in enumerate(seqs) if uses_logits_processing(s.params)]
        if not rows:
            return None
        ps = [seqs[i].params for i in rows]
        banned = [
            (r, t)
            for r, i in enumerate(rows)
            if seqs[i].num_output < (p := ps[r]).min_tokens
            for t in {*(() if p.ignore_eos else eos_ids), *p.stop_token_ids}
            if t < vocab_size
        ]
        bias = [(r, t, v) for r, p in enumerate(ps) for t, v in p.logit_bias]
        if any(not 0 <= t < vocab_size for _, t, _ in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        counted = [r for r, p in enumerate(ps) if uses_token_counts(p)]
        state_rows, fill = state.rows([seqs[rows[r]] for r in counted])
        per_row = np.zeros(len(rows), dtype=np.int64)
        per_row[counted] = state_rows

        def longs(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=np.int64)

        arrays = {
            "rows": longs(list(rows)),
            "banned_rows": longs([r for r, _ in banned]),
            "banned_tokens": longs([t for _, t in banned]),
            "bias_rows": longs([r for r, _, _ in bias]),
            "bias_tokens": longs([t for _, t, _ in bias]),
            "bias_values": np.array([v for _, _, v in bias], dtype=np.float32),
            "state_rows": per_row,
            "counted_rows": longs([rows[r] for r in counted]),
            "counted_state": longs(state_rows),
            **{f"fill.{k}": a for k, a in fill.items()},
        }
        if any(p.repetition_penalty != 1.0 for p in ps):
            arrays["repetition"] = _column([p.repetition_penalty for p in ps])
        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            arrays["frequency"] = _column([p.frequency_penalty for p in ps])
            arrays["presence"] = _column([p.presence_penalty for p in ps])
        if any(p.min_p > 0 and p.temperature > 0 for p in ps):
            arrays["min_p_offset"] = _column(
                [
                    p.temperature * math.log(p.min_p)
                    if p.min_p > 0 and p.temperature > 0
                    else -math.inf
                    for p in ps
                ]
            )

        def build(t: dict[str, torch.Tensor]) -> LogitsProcessing:
            state.fill({k[5:]: v for k, v in t.items() if k.startswith("fill.")})
            return cls(
                *(t[k] for k in ("rows", "banned_rows", "banned_tokens", "bias_rows")),
                t["bias_tokens"],
                t["bias_values"],
                state,
                t["state_rows"],
                t["counted_rows"],
                t["counted_state"],
                *(t.get(k) for k in ("repetition", "frequency", "presence", "min_p_offset")),
            )

        return Staged(arrays, build)

    @classmethod
    def build(
        cls,
        seqs: Sequence[PenalisedSequence],
        state: PenaltyState,
        eos_ids: Sequence[int],
        device: torch.device,
    ) -> LogitsProcessing | None:
        """``stage``'s tensors on ``device`` (None when no row uses any of it)."""
        staged = cls.stage(seqs, state, eos_ids)
        return None if staged is None else staged.build(upload(staged.arrays, device))

    def record(self, chosen: torch.Tensor) -> None:
        """Count the step's chosen tokens (S,) (on the device) for the rows that use token
        counts, in their ``PenaltyState`` rows."""
        if self.counted_rows.shape[0]:
            self.state.record(self.counted_state, chosen.index_select(0, self.counted_rows))

    def apply(self, logits: torch.Tensor) -> None:
        """Edit (S, vocab) fp32 ``logits`` in place (only ``rows`` change)."""
        x = logits.index_select(0, self.rows)  # (R, vocab)
        x[self.banned_rows, self.banned_tokens] = float("-inf")
        x.index_put_((self.bias_rows, self.bias_tokens), self.bias_values, accumulate=True)
        counts = None
        if self.repetition is not None:
            counts = self.state.counts.index_select(0, self.state_rows)
            seen = self.state.prompt.index_select(0, self.state_rows) | (counts > 0)
            penalised = torch.where(x > 0, x / self.repetition, x * self.repetition)
            x = torch.where(seen, penalised, x)
        if self.frequency is not None and self.presence is not None:
            if counts is None:
                counts = self.state.counts.index_select(0, self.state_rows)
            x -= self.frequency * counts + self.presence * (counts > 0)
        if self.min_p_offset is not None:
            threshold = x.max(dim=-1, keepdim=True).values + self.min_p_offset
            x = x.masked_fill(x < threshold, float("-inf"))
        logits.index_copy_(0, self.rows, x)
