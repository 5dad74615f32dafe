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
with a few sampled, penalised or structured rows does their work only. Where the worker has a
greedy head (the lm_head fused with the argmax, CPU fast path), a step whose every row is plain
greedy skips the logits altogether: ``reads_hidden`` says so before the forward pass, and
``sample_hidden`` takes the final hidden states instead of ``sample_async``'s logits.

Each stage is isolated per row (``row_faults.py``; the step's faults travel in
``SamplingPlan.faults``): a row whose grammar, penalties, sampling or log-probabilities raise is
recorded as that request's error, gets token -1, and the other rows go on (a stage batched over
rows runs again row by row only when it raises). A row whose every logit is -inf is never
sampled: it is an error too. A grammar that is complete (it allows nothing but a stop token)
ends its request: ``min_tokens`` does not hold its stop token back, and ``grammar_ended`` tells
the engine to finish it even under ``ignore_eos``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar
from weakref import WeakKeyDictionary

import numpy as np
import torch

from ..outputs import TokenLogprob
from ..sampling_params import SamplingParams
from .logprobs import LogprobTensors, compute_logprobs, prompt_logprobs
from .penalties import LogitsProcessing, PenaltyState, uses_logits_processing
from .row_faults import Faults, is_request_fault
from .sampler import SamplingTensors, sample, torch_argmax
from .upload import Staged, upload

if TYPE_CHECKING:  # xgrammar is optional: imported by structured.py, built on first use
    import xgrammar as xgr

    from .structured import StructuredOutput

NO_TOKEN = (
    "sampling: no token is allowed (every logit is -inf): the request's grammar, min_tokens "
    "and stop tokens exclude every token of the vocabulary"
)
M = TypeVar("M")


class SampledSequence(Protocol):
    """What is read from a sequence (``scheduling.sequence.Sequence`` has it)."""

    params: SamplingParams
    prompt: np.ndarray  # (num_prompt,) int32
    num_prompt: int
    seed: int
    kind: int  # ``_row_kinds(params)`` once known, else -1 (filled here)

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
    filling. ``seqs`` are the step's sampled sequences, one per logits row; ``held`` its
    structured rows that ``min_tokens`` holds back; ``masked`` the rows whose grammar mask or
    ``min_tokens`` could exclude every token (the only ones checked for that); ``faults`` the
    rows that failed so far."""

    seqs: Seq[SampledSequence]
    arrays: dict[str, np.ndarray]
    sampling: Staged[SamplingTensors] | None
    processing: Staged[LogitsProcessing] | None
    logprob_rows: list[int]
    masks: PendingMasks | None
    held: list[int]
    masked: list[int]
    faults: Faults[int]


@dataclass(frozen=True)
class SampledTokens:
    """A step's chosen tokens: ``tokens`` (S,) int64 on the device, ``host`` their copy (on
    CUDA a pinned buffer still being written until ``ready``), and the log-probability tensors
    ``collect`` turns into records."""

    plan: SamplingPlan
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: list[tuple[list[int], LogprobTensors]]  # (rows, their tensors) per computation


def _sub(t: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


class StepSampler:
    """Holds per-sequence state across steps (grammar matchers, log-probabilities so far, the
    penalties' token counts), keyed weakly by sequence so finished sequences drop theirs.
    ``structured`` builds the grammar engine on first use (compiling the vocabulary costs a
    fraction of a second); ``device`` is the logits' device. ``greedy_head``: hidden states
    (S, hidden) -> tokens (S,) int64, the argmax of their logits without the logits (None: every
    step samples from logits)."""

    def __init__(
        self,
        vocab_size: int,
        eos_ids: Seq[int],
        structured: Callable[[], StructuredOutput],
        argmax_rows: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
        device: torch.device | None = None,
        greedy_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.argmax_rows = argmax_rows
        self.greedy_head = greedy_head
        self.eos_ids = tuple(eos_ids)
        self.device = device or torch.device("cpu")
        self._make_structured = structured
        self._structured: StructuredOutput | None = None
        self._penalties: PenaltyState | None = None
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
        prompt = seq.prompt
        if start >= len(prompt) - 1 or start > len(done):
            return
        scored = prompt_logprobs(logits, prompt, start, k)
        entries = scored.entries([k] * int(scored.token_ids.shape[0]))
        done += entries[len(done) - start :]

    def prepare(self, seqs: Seq[SampledSequence]) -> SamplingPlan:
        """Plan the sampling of ``seqs`` (one per logits row) and start the grammar masks of
        the structured rows. A row whose grammar, sampling parameters or penalties cannot be
        set up is recorded in ``plan.faults`` and left out of them."""
        faults: Faults[int] = Faults()
        kinds = _kinds(seqs)
        any_kind = 0
        for k in set(kinds):
            any_kind |= k
        sampled = _rows(kinds, _SAMPLED) if any_kind & _SAMPLED else []
        logprob_rows = _rows(kinds, _LOGPROBS) if any_kind & _LOGPROBS else []
        structured = _rows(kinds, _STRUCTURED) if any_kind & _STRUCTURED else []
        processed = _rows(kinds, _PROCESSED) if any_kind & _PROCESSED else []

        def stage_sampling(rows: list[int]) -> Staged[SamplingTensors] | None:
            return SamplingTensors.stage(
                rows,
                [seqs[i].params for i in rows],
                [seqs[i].seed for i in rows],
                [seqs[i].num_output for i in rows],
            )

        def stage_processing(rows: list[int]) -> Staged[LogitsProcessing] | None:
            return LogitsProcessing.stage(seqs, self.penalties, self.eos_ids, rows)

        def probe_processing(rows: list[int]) -> object:  # on scratch state: changes nothing
            scratch = PenaltyState(self.vocab_size, torch.device("cpu"), rows=2)
            return LogitsProcessing.stage(seqs, scratch, self.eos_ids, rows)

        sampling = _staged("sampling", sampled, stage_sampling, faults)
        processing = None
        if processed:
            processing = _staged("penalties", processed, stage_processing, faults, probe_processing)
        masks = None
        matchers = {}
        for i in structured:
            matcher = faults.guard("grammar", i, self._matcher, seqs[i])
            if matcher is not None:
                matchers[i] = matcher
        if matchers:
            rows, live = list(matchers), list(matchers.values())
            masks = PendingMasks(rows, live, self.structured.fill_async(live, rows, len(seqs)))
        held = [i for i in matchers if seqs[i].num_output < seqs[i].params.min_tokens]
        arrays: dict[str, np.ndarray] = {}
        for prefix, staged in (("s.", sampling), ("p.", processing)):
            if staged is not None:
                arrays |= {prefix + k: a for k, a in staged.arrays.items()}
        if logprob_rows:
            arrays["logprob_rows"] = np.array(logprob_rows, dtype=np.int64)
        # Only a grammar mask, or min_tokens holding stop tokens back, can exclude every token.
        banned = [i for i in processed if seqs[i].num_output < seqs[i].params.min_tokens]
        masked = sorted({*matchers, *banned})
        return SamplingPlan(
            seqs, arrays, sampling, processing, logprob_rows, masks, held, masked, faults
        )

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

    def sample_async(
        self, logits: torch.Tensor, plan: SamplingPlan, tensors: dict[str, torch.Tensor]
    ) -> SampledTokens:
        """Choose each row's token from ``logits`` (S, vocab) fp32 (modified in place), on
        the device; ``tensors`` are ``plan.arrays`` on the device. Nothing here waits for the
        device (except a structured step, for its masks' fill thread). A stage that raises is
        run again row by row (each row staged on its own) and the rows that fail are recorded
        in ``plan.faults``."""
        faults = plan.faults
        raw = None
        if plan.logprob_rows:  # advanced indexing copies: the raw logits stay
            raw = logits.index_select(0, tensors["logprob_rows"])
        bitmask = None if plan.masks is None else self._bitmask(plan.masks, faults, len(plan.seqs))
        complete: list[int] = []  # held rows whose grammar is complete: min_tokens gives way
        if plan.held and bitmask is not None:
            held = faults.live(plan.held)
            complete = [
                i for i, c in zip(held, self.structured.only_stop_allowed(bitmask, held)) if c
            ]
        if complete:
            stops = torch.tensor(self.eos_ids, device=logits.device)
            at = torch.tensor(complete, device=logits.device)[:, None]
            stop_logits = logits[at, stops]  # (C, stops): before min_tokens masks them
        processors = self._process(logits, plan, tensors)
        if complete:
            logits[at, stops] = stop_logits
        if plan.masks is not None and bitmask is not None:
            masked = faults.live(plan.masks.rows)
            faults.isolate(
                "grammar mask",
                masked,
                lambda: self.structured.apply(logits, masked, bitmask),
                lambda i: self.structured.apply(logits, [i], bitmask),
            )
        chosen = self._draw(logits, plan, tensors)
        valid = chosen.clamp(min=0) if plan.faults.errors else chosen  # -1 only on failed rows
        for processing in processors:
            processing.record(valid)
        logprobs = [] if raw is None else self._logprobs_of(raw, chosen, plan)
        if plan.masked:  # a row whose every logit is -inf was not sampled: never emit its pick
            at = torch.tensor(plan.masked, device=logits.device)
            picks = chosen[at]
            picked = logits[at, picks.clamp(min=0)]
            chosen[at] = torch.where(picked == float("-inf"), -1, picks)
        if chosen.device.type != "cuda":
            return SampledTokens(plan, chosen, chosen, None, logprobs)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(plan, chosen, host, ready, logprobs)

    def reads_hidden(self, plan: SamplingPlan) -> bool:
        """Whether the step's tokens come from its final hidden states (``sample_hidden``):
        there is a greedy head and every row is greedy with no log-probabilities, penalties,
        biases, ``min_tokens`` or grammar."""
        return (
            self.greedy_head is not None
            and plan.sampling is None
            and plan.processing is None
            and plan.masks is None
            and not plan.logprob_rows
            and not plan.masked
        )

    def sample_hidden(self, hidden: torch.Tensor, plan: SamplingPlan) -> SampledTokens:
        """``sample_async`` for a step ``reads_hidden`` accepts: each row's greedy token from
        its final-norm hidden state ``hidden`` (S, hidden) fp32, through the greedy head. When
        the head raises for the batch, it runs row by row and the rows that raise again get -1
        and their error in ``plan.faults``."""
        head = self.greedy_head
        assert head is not None, "no greedy head: sample from logits"
        chosen = torch.full((len(plan.seqs),), -1, dtype=torch.long, device=hidden.device)

        def batch() -> None:
            chosen.copy_(head(hidden))

        def one(i: int) -> None:
            chosen[i] = head(hidden[i : i + 1])[0]

        plan.faults.isolate("sampling", range(len(plan.seqs)), batch, one)
        return SampledTokens(plan, chosen, chosen, None, [])

    def _bitmask(self, masks: PendingMasks, faults: Faults[int], batch: int) -> torch.Tensor:
        """The masks filled during the forward pass; when that fill raised, each row is filled
        on its own and the rows that raise again are recorded."""
        try:
            return masks.bitmask.result()
        except Exception as exc:
            if not is_request_fault(exc):
                raise
        bitmask = self.structured.allocate(batch)
        for i, matcher in zip(masks.rows, masks.matchers):
            faults.guard("grammar mask", i, self.structured.fill, [matcher], [i], bitmask)
        return bitmask

    def _process(
        self, logits: torch.Tensor, plan: SamplingPlan, tensors: dict[str, torch.Tensor]
    ) -> list[LogitsProcessing]:
        """Apply the penalties in place; the processing objects whose ``record`` counts the
        chosen tokens (one for the step, or one per row after a failure)."""
        if plan.processing is None:
            return []
        staged = plan.processing
        done: list[LogitsProcessing] = []

        def batch() -> None:
            processing = staged.build(_sub(tensors, "p."))
            processing.apply(logits)  # writes only at its end: nothing is applied when it raises
            done.append(processing)

        def one(i: int) -> None:
            alone = LogitsProcessing.stage(plan.seqs, self.penalties, self.eos_ids, [i])
            if alone is not None:
                processing = alone.build(upload(alone.arrays, logits.device))
                processing.apply(logits)
                done.append(processing)

        rows = staged.arrays["rows"].tolist()
        plan.faults.isolate("penalties", rows, batch, one)
        return done

    def _draw(
        self, logits: torch.Tensor, plan: SamplingPlan, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(S,) int64 sampled tokens; -1 on rows that failed."""
        drawn: list[torch.Tensor] = []
        staged = plan.sampling

        def batch() -> None:
            tensors_s = None if staged is None else staged.build(_sub(tensors, "s."))
            drawn.append(sample(logits, tensors_s, self.argmax_rows))

        def one(i: int) -> None:
            if not drawn:
                drawn.append(
                    torch.full((len(plan.seqs),), -1, dtype=torch.long, device=logits.device)
                )
            seq = plan.seqs[i]
            alone = None
            if not seq.params.greedy:
                alone = SamplingTensors.build(
                    [seq.params], [seq.seed], [seq.num_output], logits.device
                )
            drawn[0][i] = sample(logits[i : i + 1], alone, self.argmax_rows)[0]

        plan.faults.isolate("sampling", range(len(plan.seqs)), batch, one)
        if not drawn:  # every row had failed before
            return torch.full((len(plan.seqs),), -1, dtype=torch.long, device=logits.device)
        return drawn[0]

    def _logprobs_of(
        self, raw: torch.Tensor, chosen: torch.Tensor, plan: SamplingPlan
    ) -> list[tuple[list[int], LogprobTensors]]:
        """The chosen tokens' raw log-probabilities (``raw``: the rows ``plan.logprob_rows``)."""
        at = {i: j for j, i in enumerate(plan.logprob_rows)}
        out: list[tuple[list[int], LogprobTensors]] = []

        def compute(rows: list[int]) -> None:
            index = torch.tensor([at[i] for i in rows], device=raw.device)
            top = max(plan.seqs[i].params.logprobs or 0 for i in rows)
            tokens = chosen.index_select(0, torch.tensor(rows, device=chosen.device))
            out.append(
                (rows, compute_logprobs(raw.index_select(0, index), tokens.clamp(min=0), top))
            )

        live = plan.faults.live(plan.logprob_rows)
        plan.faults.isolate("logprobs", live, lambda: compute(live), lambda i: compute([i]))
        return out

    def collect(self, sampled: SampledTokens) -> list[int]:
        """The step's tokens on the host (waits for the device), with the log-probabilities
        recorded and the matchers advanced, for the sequences not finished since the step was
        launched (overlap scheduling launches a step before the previous one's stop checks).
        Rows in ``plan.faults`` (those that failed, or had no allowed token) get -1."""
        if sampled.ready is not None:
            sampled.ready.synchronize()
        tokens = sampled.host.tolist()
        plan = sampled.plan
        seqs, faults = plan.seqs, plan.faults
        if -1 in tokens:
            for i, token in enumerate(tokens):
                if token < 0:
                    faults.fail(i, NO_TOKEN)
        for rows, tensors in sampled.logprobs:
            tops = [seqs[i].params.logprobs or 0 for i in rows]
            for i, entry in zip(rows, tensors.entries(tops)):
                if seqs[i].finish_reason is None and i not in faults:
                    self._logprobs.setdefault(seqs[i], []).append(entry)
        if plan.masks is not None:
            self._accept(plan, tokens)
        if faults.errors:
            return [-1 if i in faults else t for i, t in enumerate(tokens)]
        return tokens

    def _accept(self, plan: SamplingPlan, tokens: list[int]) -> None:
        """Advance the live structured rows' matchers by their tokens; a token the grammar
        rejects is that row's error. (xgrammar's batched accept raises only before accepting
        anything, on a size mismatch, so a rerun row by row never accepts a token twice.)"""
        assert plan.masks is not None
        seqs, faults = plan.seqs, plan.faults
        matcher = dict(zip(plan.masks.rows, plan.masks.matchers))

        def accept(rows: list[int]) -> None:
            accepted = self.structured.accept([matcher[i] for i in rows], [tokens[i] for i in rows])
            for i, ok in zip(rows, accepted):
                if not ok:
                    faults.fail(i, f"grammar: the grammar rejected token {tokens[i]}")

        live = [i for i in faults.live(plan.masks.rows) if seqs[i].finish_reason is None]
        faults.isolate("grammar", live, lambda: accept(live), lambda i: accept([i]))

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


def _kinds(seqs: Seq[SampledSequence]) -> list[int]:
    """``_row_kinds`` of each sequence's params, cached on the sequence (params are frozen): a
    step reads only the sequence objects, not their params."""
    out = []
    for seq in seqs:
        k = seq.kind
        if k < 0:
            k = seq.kind = _row_kinds(seq.params)
        out.append(k)
    return out


def _rows(kinds: list[int], flag: int) -> list[int]:
    return [i for i, k in enumerate(kinds) if k & flag]


def _staged(
    stage: str,
    rows: list[int],
    make: Callable[[list[int]], Staged[M] | None],
    faults: Faults[int],
    probe: Callable[[list[int]], object] | None = None,
) -> Staged[M] | None:
    """``make(rows)``; when that raises a request fault, ``probe`` (default ``make``) for each
    row alone finds the rows that fail (recorded in ``faults``) and the others are staged
    together. ``make`` must raise before it changes any state (``LogitsProcessing.stage``
    checks each row's values before it takes penalty-state rows); ``probe`` must change none."""
    if not rows:
        return None
    try:
        return make(rows)
    except Exception as exc:
        if not is_request_fault(exc):
            raise
    for i in rows:
        faults.guard(stage, i, probe or make, [i])
    live = faults.live(rows)
    return make(live) if live else None
