"""Everything between a step's forward pass and its next tokens.

Per step, only for the rows that ask for it:

1. before the forward pass, ``prepare`` starts filling the grammar masks of structured rows on a
   worker thread (the matchers already hold the previous step's tokens);
2. after it, ``sample`` keeps the raw logits of rows that want log-probabilities, applies
   penalties and biases (``penalties.py``), then the grammar masks, samples (``sampler.py``),
   records log-probabilities of the chosen tokens from the raw logits, and advances the matchers.

A step where nobody uses these features is the plain sampler plus a few list comprehensions; a
step with a few structured rows masks those rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from weakref import WeakKeyDictionary

import torch

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from .logprobs import compute_logprobs, prompt_logprobs
from .penalties import LogitsProcessing
from .sampler import SamplingTensors, sample, torch_argmax

if TYPE_CHECKING:  # xgrammar is optional: imported by structured.py, built on first use
    import xgrammar as xgr

    from .structured import StructuredOutput


class SampledSequence(Protocol):
    """What is read from a sequence (``scheduling.sequence.Sequence`` has it)."""

    params: SamplingParams
    tokens: list[int]
    num_prompt: int
    seed: int

    @property
    def num_output(self) -> int: ...

    @property
    def output_tokens(self) -> list[int]: ...


@dataclass(frozen=True)
class PendingMasks:
    """Grammar masks being filled for ``rows`` of the step while the forward pass runs."""

    rows: list[int]
    matchers: list[xgr.GrammarMatcher]
    bitmask: Future[torch.Tensor]


class StepSampler:
    """Holds per-sequence state across steps (grammar matchers, log-probabilities so far), keyed
    weakly by sequence so finished sequences drop theirs. ``structured`` builds the grammar
    engine on first use (compiling the vocabulary costs a fraction of a second)."""

    def __init__(
        self,
        vocab_size: int,
        eos_ids: Seq[int],
        structured: Callable[[], StructuredOutput],
        argmax_rows: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
    ) -> None:
        self.vocab_size = vocab_size
        self.argmax_rows = argmax_rows
        self.eos_ids = tuple(eos_ids)
        self._make_structured = structured
        self._structured: StructuredOutput | None = None
        self._matchers: WeakKeyDictionary[SampledSequence, xgr.GrammarMatcher] = WeakKeyDictionary()
        self._logprobs: WeakKeyDictionary[SampledSequence, list[TokenLogprob]] = WeakKeyDictionary()
        self._prompt: WeakKeyDictionary[SampledSequence, list[TokenLogprob]] = WeakKeyDictionary()

    @property
    def structured(self) -> StructuredOutput:
        if self._structured is None:
            self._structured = self._make_structured()
        return self._structured

    def logprobs(self, seq: SampledSequence) -> list[TokenLogprob]:
        """The log-probabilities of ``seq``'s output tokens so far (empty when not asked for)."""
        return self._logprobs.get(seq, [])

    def prompt_logprobs(self, seq: SampledSequence) -> list[TokenLogprob]:
        """The log-probabilities of ``seq``'s prompt tokens 1.. scored so far."""
        return self._prompt.get(seq, [])

    def score_prompt(self, seq: SampledSequence, start: int, logits: torch.Tensor) -> None:
        """Record what a prefill chunk's logits (T, vocab) fp32, at prompt positions
        ``start ..``, say about the prompt tokens after them; a chunk recomputed after a
        preemption adds nothing already recorded."""
        done = self._prompt.setdefault(seq, [])
        k = seq.params.prompt_logprobs or 0
        prompt = seq.tokens[: seq.num_prompt]
        if start >= len(prompt) - 1 or start > len(done):
            return
        scored = prompt_logprobs(logits, prompt, start, k)
        entries = scored.entries([k] * int(scored.token_ids.shape[0]))
        done += entries[len(done) - start :]

    def prepare(self, seqs: Seq[SampledSequence]) -> PendingMasks | None:
        """Start the grammar masks of this step's structured rows; None when there are none.
        Raises ValueError when a request's grammar does not compile."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return None
        matchers = [self._matcher(seqs[i]) for i in rows]
        return PendingMasks(rows, matchers, self.structured.fill_async(matchers, rows, len(seqs)))

    def _matcher(self, seq: SampledSequence) -> xgr.GrammarMatcher:
        matcher = self._matchers.get(seq)
        if matcher is None:
            assert seq.params.structured is not None
            matcher = self.structured.matcher(seq.params.structured)
            self._matchers[seq] = matcher
        return matcher

    def sample(
        self, logits: torch.Tensor, seqs: Seq[SampledSequence], pending: PendingMasks | None
    ) -> list[int]:
        """Next token of each row of ``logits`` (S, vocab) fp32 (modified in place)."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = logits[want] if want else None  # advanced indexing copies: the raw logits stay
        processing = LogitsProcessing.build(
            [s.params for s in seqs],
            [s.tokens[: s.num_prompt] for s in seqs],
            [s.output_tokens for s in seqs],
            self.eos_ids,
            self.vocab_size,
            logits.device,
        )
        if processing is not None:
            processing.apply(logits)
        if pending is not None:
            self.structured.apply(logits, pending.rows, pending.bitmask.result())
        tensors = SamplingTensors.build(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [s.num_output for s in seqs],
            logits.device,
        )
        chosen = sample(logits, tensors, self.argmax_rows)
        if raw is not None:
            tops = [seqs[i].params.logprobs or 0 for i in want]
            entries = compute_logprobs(raw, chosen[want], max(tops)).entries(tops)
            for i, entry in zip(want, entries):
                self._logprobs.setdefault(seqs[i], []).append(entry)
        tokens = chosen.tolist()
        if pending is not None:
            self.structured.accept(pending.matchers, [tokens[i] for i in pending.rows])
        return tokens
