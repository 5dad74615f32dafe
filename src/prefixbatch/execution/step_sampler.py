"""Everything between a step's forward pass and its next tokens.

Per step, only for the rows that ask for it:

1. before the forward pass, ``prepare`` plans the step on the host: the sampled rows'
   parameters and the penalty rows' tensors become arrays that travel to the device with the
   step's inputs (``SamplingPlan.arrays``), and the grammar masks of structured rows start
   filling on a worker thread (the matchers already hold the previous step's tokens);
2. after it, ``sample_async`` keeps the raw logits of rows that want log-probabilities, applies
   penalties and biases (``penalties.py``), then the grammar masks, samples (``sampler.py``),
   counts the chosen tokens for the penalties and starts the tokens' copy to the host: all on
   the device, nothing waits for it;
3. ``collect`` waits for the tokens, records log-probabilities of the chosen tokens (from the raw
   logits) and advances the matchers.

Host work per step is one pass over the rows (what each request's parameters need is worked out
once per request); a step where nobody uses these features is one argmax and one copy, a step
with a few sampled, penalised or structured rows does their work only.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from weakref import WeakKeyDictionary

import numpy as np
import torch

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from .logprobs import LogprobTensors, compute_logprobs, prompt_logprobs
from .penalties import LogitsProcessing, PenaltyState, uses_logits_processing
from .sampler import SamplingTensors, sample, torch_argmax
from .upload import Staged, upload

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


@dataclass(frozen=True)
class PendingMasks:
    """Grammar masks being filled for ``rows`` of the step while the forward pass runs."""

    rows: list[int]
    matchers: list[xgr.GrammarMatcher]
    bitmask: Future[torch.Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """One step's sampling, planned on the host before its forward pass: ``arrays`` must reach
    the device with the step's inputs (``ModelRunner.execute``'s ``extra``), ``masks`` are
    filling. ``seqs`` are the step's sampled sequences, one per logits row."""

    seqs: Seq[SampledSequence]
    arrays: dict[str, np.ndarray]
    sampling: Staged[SamplingTensors] | None
    processing: Staged[LogitsProcessing] | None
    logprob_rows: list[int]
    masks: PendingMasks | None


@dataclass(frozen=True)
class SampledTokens:
    """A step's chosen tokens: ``tokens`` (S,) int64 on the device, ``host`` their copy (on
    CUDA a pinned buffer still being written until ``ready``), and the log-probability tensors
    ``collect`` turns into records."""

    plan: SamplingPlan
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: LogprobTensors | None


def _sub(t: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


class StepSampler:
    """Holds per-sequence state across steps (grammar matchers, log-probabilities so far, the
    penalties' token counts), keyed weakly by sequence so finished sequences drop theirs.
    ``structured`` builds the grammar engine on first use (compiling the vocabulary costs a
    fraction of a second); ``device`` is the logits' device."""

    def __init__(
        self,
        vocab_size: int,
        eos_ids: Seq[int],
        structured: Callable[[], StructuredOutput],
        argmax_rows: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
        device: torch.device | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.argmax_rows = argmax_rows
        self.eos_ids = tuple(eos_ids)
        self.device = device or torch.device("cpu")
        self._make_structured = structured
        self._structured: StructuredOutput | None = None
        self._penalties: PenaltyState | None = None
        self._kinds = _Kinds()
        self._matchers: WeakKeyDictionary[SampledSequence, xgr.GrammarMatcher] = WeakKeyDictionary()
        self._logprobs: WeakKeyDictionary[SampledSequence, list[TokenLogprob]] = WeakKeyDictionary()
        self._prompt: WeakKeyDictionary[SampledSequence, list[TokenLogprob]] = WeakKeyDictionary()

    @property
    def structured(self) -> StructuredOutput:
        if self._structured is None:
            self._structured = self._make_structured()
        return self._structured

    @property
    def penalties(self) -> PenaltyState:
        if self._penalties is None:
            self._penalties = PenaltyState(self.vocab_size, self.device)
        return self._penalties

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

    def prepare(self, seqs: Seq[SampledSequence]) -> SamplingPlan:
        """Plan the sampling of ``seqs`` (one per logits row) and start the grammar masks of
        the structured rows. Raises ValueError when a request's grammar does not compile or a
        ``logit_bias`` token is outside the vocabulary."""
        kinds = self._kinds.of(seqs)
        any_kind = 0
        for k in set(kinds):
            any_kind |= k
        sampled = _rows(kinds, _SAMPLED) if any_kind & _SAMPLED else []
        logprob_rows = _rows(kinds, _LOGPROBS) if any_kind & _LOGPROBS else []
        structured = _rows(kinds, _STRUCTURED) if any_kind & _STRUCTURED else []
        processed = _rows(kinds, _PROCESSED) if any_kind & _PROCESSED else []
        sampling = SamplingTensors.stage(
            sampled,
            [seqs[i].params for i in sampled],
            [seqs[i].seed for i in sampled],
            [seqs[i].num_output for i in sampled],
        )
        processing = None
        if processed:
            processing = LogitsProcessing.stage(seqs, self.penalties, self.eos_ids, processed)
        masks = None
        if structured:
            matchers = [self._matcher(seqs[i]) for i in structured]
            bitmask = self.structured.fill_async(matchers, structured, len(seqs))
            masks = PendingMasks(structured, matchers, bitmask)
        arrays: dict[str, np.ndarray] = {}
        for prefix, staged in (("s.", sampling), ("p.", processing)):
            if staged is not None:
                arrays |= {prefix + k: a for k, a in staged.arrays.items()}
        if logprob_rows:
            arrays["logprob_rows"] = np.array(logprob_rows, dtype=np.int64)
        return SamplingPlan(seqs, arrays, sampling, processing, logprob_rows, masks)

    def _matcher(self, seq: SampledSequence) -> xgr.GrammarMatcher:
        matcher = self._matchers.get(seq)
        if matcher is None:
            assert seq.params.structured is not None
            matcher = self.structured.matcher(seq.params.structured)
            self._matchers[seq] = matcher
        return matcher

    def sample_async(
        self, logits: torch.Tensor, plan: SamplingPlan, tensors: dict[str, torch.Tensor]
    ) -> SampledTokens:
        """Choose each row's token from ``logits`` (S, vocab) fp32 (modified in place), on
        the device; ``tensors`` are ``plan.arrays`` on the device. Nothing here waits for the
        device (except a structured step, for its masks' fill thread)."""
        raw = None
        if plan.logprob_rows:  # advanced indexing copies: the raw logits stay
            raw = logits.index_select(0, tensors["logprob_rows"])
        processing = None
        if plan.processing is not None:
            processing = plan.processing.build(_sub(tensors, "p."))
            processing.apply(logits)
        if plan.masks is not None:
            self.structured.apply(logits, plan.masks.rows, plan.masks.bitmask.result())
        sampling = None if plan.sampling is None else plan.sampling.build(_sub(tensors, "s."))
        chosen = sample(logits, sampling, self.argmax_rows)
        if processing is not None:
            processing.record(chosen)
        logprobs = None
        if raw is not None:
            top = max(plan.seqs[i].params.logprobs or 0 for i in plan.logprob_rows)
            logprobs = compute_logprobs(raw, chosen.index_select(0, tensors["logprob_rows"]), top)
        if chosen.device.type != "cuda":
            return SampledTokens(plan, chosen, chosen, None, logprobs)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(plan, chosen, host, ready, logprobs)

    def collect(self, sampled: SampledTokens) -> list[int]:
        """The step's tokens on the host (waits for the device), with the log-probabilities
        recorded and the matchers advanced, for the sequences not finished since the step was
        launched (overlap scheduling launches a step before the previous one's stop checks)."""
        if sampled.ready is not None:
            sampled.ready.synchronize()
        tokens = sampled.host.tolist()
        plan = sampled.plan
        seqs = plan.seqs
        if sampled.logprobs is not None:
            want = plan.logprob_rows
            tops = [seqs[i].params.logprobs or 0 for i in want]
            for i, entry in zip(want, sampled.logprobs.entries(tops)):
                if seqs[i].finish_reason is None:
                    self._logprobs.setdefault(seqs[i], []).append(entry)
        if plan.masks is not None:
            live = [j for j, i in enumerate(plan.masks.rows) if seqs[i].finish_reason is None]
            matchers = [plan.masks.matchers[j] for j in live]
            self.structured.accept(matchers, [tokens[plan.masks.rows[j]] for j in live])
        return tokens

    def sample(self, logits: torch.Tensor, plan: SamplingPlan) -> list[int]:
        """``sample_async`` and ``collect`` in one call (``plan.arrays`` uploaded here)."""
        tensors = upload(plan.arrays, logits.device)
        return self.collect(self.sample_async(logits, plan, tensors))


# What a row needs beyond greedy argmax (bit flags of ``_row_kinds``).
_SAMPLED, _LOGPROBS, _STRUCTURED, _PROCESSED = 1, 2, 4, 8


def _row_kinds(p: SamplingParams) -> int:
    return (
        (0 if p.greedy else _SAMPLED)
        | (0 if p.logprobs is None else _LOGPROBS)
        | (0 if p.structured is None else _STRUCTURED)
        | (_PROCESSED if uses_logits_processing(p) else 0)
    )


class _Kinds(dict[int, tuple[SamplingParams, int]]):
    """``_row_kinds`` of each ``SamplingParams`` object by id (the object is kept alive with
    its entry, so an id is never reused while cached); emptied when it grows large."""

    def of(self, seqs: Seq[SampledSequence]) -> list[int]:
        if len(self) > 1 << 16:
            self.clear()
        out = []
        for seq in seqs:
            p = seq.params
            entry = self.get(id(p))
            if entry is None:
                entry = self[id(p)] = (p, _row_kinds(p))
            out.append(entry[1])
        return out


def _rows(kinds: list[int], flag: int) -> list[int]:
    return [i for i, k in enumerate(kinds) if k & flag]
