"""Everything between a step's forward pass and its next tokens.

Per step, only for the rows that ask for it:

1. before the forward pass, ``prepare`` starts filling the grammar masks of structured rows on a
   worker thread (the matchers already hold the previous step's tokens);
2. after it, ``sample`` keeps the raw logits of rows that want log-probabilities, applies
   penalties and biases (``penalties.py``), then the grammar masks, samples (``sampler.py``),
   records log-probabilities of the chosen tokens from the raw logits, and advances the matchers.

Each stage is isolated per row (``row_faults.py``): a row whose grammar, penalties, sampling or
log-probabilities raise is recorded as that request's error and the other rows go on. A grammar
that is complete (it allows nothing but a stop token) ends its request: ``min_tokens`` does not
mask the stop token there, and ``grammar_ended`` tells the engine to finish the request even
under ``ignore_eos``. A row whose every logit is -inf is never sampled: it is an error.

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
from .penalties import LogitsProcessing, uses_logits_processing
from .row_faults import Faults, is_request_fault
from .sampler import SamplingTensors, sample, torch_argmax

if TYPE_CHECKING:  # xgrammar is optional: imported by structured.py, built on first use
    import xgrammar as xgr

    from .structured import StructuredOutput

NO_TOKEN = (
    "sampling: no token is allowed (every logit is -inf): the request's grammar, min_tokens "
    "and stop tokens exclude every token of the vocabulary"
)


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

    def prepare(self, seqs: Seq[SampledSequence], faults: Faults[int]) -> PendingMasks | None:
        """Start the grammar masks of this step's structured rows; None when there are none. A
        row whose grammar cannot be set up is recorded in ``faults`` (by row)."""
        matchers = {}
        for i, seq in enumerate(seqs):
            if seq.params.structured is not None:
                matcher = faults.guard("grammar", i, self._matcher, seq)
                if matcher is not None:
                    matchers[i] = matcher
        if not matchers:
            return None
        rows, live = list(matchers), list(matchers.values())
        return PendingMasks(rows, live, self.structured.fill_async(live, rows, len(seqs)))

    def _matcher(self, seq: SampledSequence) -> xgr.GrammarMatcher:
        matcher = self._matchers.get(seq)
        if matcher is None:
            assert seq.params.structured is not None
            matcher = self.structured.matcher(seq.params.structured)
            self._matchers[seq] = matcher
        return matcher

    def grammar_ended(self, seq: SampledSequence) -> bool:
        """Whether ``seq``'s grammar has accepted a stop token: the request must end there,
        whatever ``ignore_eos`` and ``min_tokens`` say (nothing can follow a complete grammar)."""
        matcher = self._matchers.get(seq)
        return matcher is not None and matcher.is_terminated()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: Seq[SampledSequence],
        pending: PendingMasks | None,
        faults: Faults[int],
    ) -> list[int]:
        """Next token of each row of ``logits`` (S, vocab) fp32 (modified in place). A row that
        fails at any stage (or has no allowed token: every logit -inf) is recorded in
        ``faults`` and gets token -1; the other rows are not affected by it."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = logits[want] if want else None  # advanced indexing copies: the raw logits stay
        bitmask = self._bitmask(pending, faults, len(seqs)) if pending is not None else None
        self._penalize(logits, seqs, pending, bitmask, faults)
        if pending is not None and bitmask is not None:
            masked = faults.live(pending.rows)
            faults.isolate(
                "grammar mask",
                masked,
                lambda: self.structured.apply(logits, masked, bitmask),
                lambda i: self.structured.apply(logits, [i], bitmask),
            )
        chosen = self._draw(logits, seqs, faults)
        tokens = chosen.tolist()
        if -1 in tokens:
            for i, token in enumerate(tokens):
                if token < 0:
                    faults.fail(i, NO_TOKEN)
        if raw is not None:
            self._record_logprobs(raw, want, chosen, seqs, faults)
        if pending is not None:
            self._accept(pending, tokens, faults)
        if faults.errors:
            return [-1 if i in faults else t for i, t in enumerate(tokens)]
        return tokens

    def _bitmask(self, pending: PendingMasks, faults: Faults[int], batch: int) -> torch.Tensor:
        """The masks filled during the forward pass; when that fill raised, each row is filled
        on its own and the rows that raise again are recorded."""
        try:
            return pending.bitmask.result()
        except Exception as exc:
            if not is_request_fault(exc):
                raise
        bitmask = self.structured.allocate(batch)
        for i, matcher in zip(pending.rows, pending.matchers):
            faults.guard("grammar mask", i, self.structured.fill, [matcher], [i], bitmask)
        return bitmask

    def _penalize(
        self,
        logits: torch.Tensor,
        seqs: Seq[SampledSequence],
        pending: PendingMasks | None,
        bitmask: torch.Tensor | None,
        faults: Faults[int],
    ) -> None:
        """Penalties, biases, min_p and min_tokens (``penalties.py``) on the rows using them."""
        rows = [i for i, s in enumerate(seqs) if uses_logits_processing(s.params)]
        if not rows:
            return
        done: set[int] = set()  # structured rows held back by min_tokens whose grammar is complete
        if pending is not None and bitmask is not None:
            held = [
                i
                for i in faults.live(pending.rows)
                if seqs[i].num_output < seqs[i].params.min_tokens
            ]
            if held:
                complete = self.structured.only_stop_allowed(bitmask, held)
                done = {i for i, c in zip(held, complete) if c}

        def build(part: Seq[int]) -> LogitsProcessing | None:
            return LogitsProcessing.build(
                [seqs[i].params for i in part],
                [seqs[i].tokens[: seqs[i].num_prompt] for i in part],
                [seqs[i].output_tokens for i in part],
                self.eos_ids,
                self.vocab_size,
                logits.device,
                [j for j, i in enumerate(part) if i in done],
            )

        def batch() -> None:
            processing = build(range(len(seqs)))
            if processing is not None:
                processing.apply(logits)

        def one(i: int) -> None:
            processing = build([i])
            if processing is not None:
                processing.apply(logits[i : i + 1])  # a view: written in place

        faults.isolate("penalties", rows, batch, one)

    def _draw(
        self, logits: torch.Tensor, seqs: Seq[SampledSequence], faults: Faults[int]
    ) -> torch.Tensor:
        """(S,) int64 sampled tokens; -1 on rows that failed or whose every logit is -inf."""
        drawn: list[torch.Tensor] = []

        def draw(part: Seq[int], rows: torch.Tensor) -> torch.Tensor:
            tensors = SamplingTensors.build(
                [seqs[i].params for i in part],
                [seqs[i].seed for i in part],
                [seqs[i].num_output for i in part],
                logits.device,
            )
            return sample(rows, tensors, self.argmax_rows)

        def one(i: int) -> None:
            if not drawn:
                drawn.append(torch.full((len(seqs),), -1, dtype=torch.long, device=logits.device))
            drawn[0][i] = draw([i], logits[i : i + 1])[0]

        batch = range(len(seqs))
        faults.isolate("sampling", batch, lambda: drawn.append(draw(batch, logits)), one)
        if not drawn:  # every row had failed before
            return torch.full((len(seqs),), -1, dtype=torch.long, device=logits.device)
        chosen = drawn[0]
        # A row whose every logit is -inf was not sampled from anything: never emit its pick.
        picked = logits.gather(1, chosen.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(picked == float("-inf"), -1, chosen)

    def _record_logprobs(
        self,
        raw: torch.Tensor,
        want: list[int],
        chosen: torch.Tensor,
        seqs: Seq[SampledSequence],
        faults: Faults[int],
    ) -> None:
        """Append the chosen tokens' raw log-probabilities (``raw``: the rows ``want``)."""
        at = {i: j for j, i in enumerate(want)}

        def record(part: list[int]) -> None:
            index = torch.tensor([at[i] for i in part], device=raw.device)
            tops = [seqs[i].params.logprobs or 0 for i in part]
            tokens = chosen[part].clamp(min=0)
            entries = compute_logprobs(raw[index], tokens, max(tops)).entries(tops)
            for i, entry in zip(part, entries):  # written only once all are computed
                self._logprobs.setdefault(seqs[i], []).append(entry)

        live = faults.live(want)
        faults.isolate("logprobs", live, lambda: record(live), lambda i: record([i]))

    def _accept(self, pending: PendingMasks, tokens: list[int], faults: Faults[int]) -> None:
        """Advance the live structured rows' matchers by their tokens; a token the grammar
        rejects is that row's error. (xgrammar's batched accept raises only before accepting
        anything, on a size mismatch, so a rerun row by row never accepts a token twice.)"""
        matcher = dict(zip(pending.rows, pending.matchers))

        def accept(part: list[int]) -> None:
            accepted = self.structured.accept([matcher[i] for i in part], [tokens[i] for i in part])
            for i, ok in zip(part, accepted):
                if not ok:
                    faults.fail(i, f"grammar: the grammar rejected token {tokens[i]}")

        live = faults.live(pending.rows)
        faults.isolate("grammar", live, lambda: accept(live), lambda i: accept([i]))
