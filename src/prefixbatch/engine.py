"""The engine: requests in, one forward step at a time, finished outputs out.

``add_requests`` takes a whole batch with its plan (BatchLLM's global planning: the job or the
Python API plans, the engine consumes the plan), ``step`` runs one scheduled forward pass and
returns the requests that finished in it, ``abort`` drops a request, and ``generate`` is a loop
over ``step``. Every front end (CLI job, Python API, Ray worker, server) drives this loop.

Admission streams: a batch becomes ``Request`` and ``Sequence`` objects only as the scheduler's
queue needs them (``scheduling/admission.py``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import EngineConfig
from .detokenizer import OutputTexts
from .errors import KVBudgetError
from .execution.attention.backend import AttentionBackend
from .execution.pooler import StepPooler
from .execution.row_faults import Faults
from .execution.step_sampler import SampledTokens, StepSampler
from .loading.builder import LoadedModel, load_model
from .loading.limits import EngineLimits
from .outputs import CompletionOutput, Request, RequestOutput
from .planning.plan import Plan, make_plan
from .scheduling.admission import AdmissionWindow, PendingBatches
from .scheduling.block_manager import BlockManager
from .scheduling.request_source import RequestList, RequestSource
from .scheduling.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from .scheduling.sequence import Sequence, Status
from .scheduling.work import WorkStream

if TYPE_CHECKING:
    from .execution.structured import StructuredOutput

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters of one batch (one ``generate`` call), or of a worker's share of a job."""

    requests: int = 0
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    output_tokens: int = 0  # of finished requests
    sampled_tokens: int = 0  # every token sampled so far, finished or not
    preemptions: int = 0
    steps: int = 0
    cache_hit_tokens: int = 0
    groups: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: EngineStats) -> None:
        """Accumulate another engine's counters (workers of one distributed job)."""
        for f in fields(self):
            if f.name != "extra":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def prefill_tokens_saved(self) -> int:
        """Prompt tokens whose KV was not computed for their request: shared through a prefix
        group or taken from the prefix cache. Never negative: tokens recomputed after a
        preemption count as computed once more, not as negative savings."""
        return max(0, self.prompt_tokens - self.prefill_tokens_computed)


class LLMEngine:
    """Runs tokenized requests on one loaded model under one scheduling policy.

    ``loaded`` lets several engines share one loaded model (e.g. the same weights under two
    policies); they also share its KV pool, so only one of them may hold unfinished requests at
    a time.
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or load_model(config)
        self.tokenizer = self.loaded.tokenizer
        self.model_name = self.loaded.name
        self.limits: EngineLimits = self.loaded.limits
        self.eos_ids = self.loaded.eos_ids
        self.blocks = BlockManager(
            self.limits.num_blocks,
            config.block_size,
            enable_prefix_cache=config.policy.prefix_cache,
        )
        cap = config.max_num_seqs if config.policy.caps_requests else None
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_batched_tokens,
                cap,
                self.limits.max_model_len,
                embedding_rows=self.limits.pooling.every_row,
            ),
            self.blocks,
            self.eos_ids,
        )
        self.worker = self.loaded.worker
        self.runner = self.worker.runner(
            share_prefix_attention=config.policy.plans, min_shared=config.cascade_min_prefix
        )
        # Penalties, grammar masks, sampling, log-probabilities; the grammar engine is built
        # only when a request asks for structured output.
        self.sampler = StepSampler(
            self.limits.vocab_size,
            self.eos_ids,
            self._grammars,
            self.worker.argmax,
            self.worker.device,
            self.worker.greedy_head,
        )
        self.stats = EngineStats()
        self._requests: dict[int, Request] = {}  # unfinished requests by id
        self._sequences: dict[int, list[Sequence]] = {}  # a request's choices by request id
        self._finished: dict[int, list[Sequence]] = {}  # choices that ended, by request id
        self._texts = OutputTexts(self.tokenizer.hf)  # incremental detokenizers
        self._group_ids = itertools.count()  # unique among the engine's levels
        self.admission = AdmissionWindow.for_budget(config.max_num_batched_tokens)
        self._pending = PendingBatches()  # added, not yet fully admitted
        self._doomed: set[int] = set()  # aborted before their sequences were made
        overlap = config.overlap_schedule
        self.overlap = self.worker.device.type == "cuda" if overlap is None else overlap
        self._inflight: _InFlight | None = None  # a launched step whose tokens are not taken in
        self._scoring = 0  # unfinished requests that ask for prompt log-probabilities
        self.pooler = StepPooler(self.limits.pooling)
        self.score_head = self.loaded.score_head
        self._embeds = False  # the requests in flight are embedding requests

    def _grammars(self) -> StructuredOutput:
        # Imported on first use: xgrammar is optional (requests that need it were refused).
        from .execution.structured import StructuredOutput

        return StructuredOutput(self.tokenizer.hf, self.limits.vocab_size, self.eos_ids)

    @property
    def backend(self) -> AttentionBackend:
        return self.worker.backend

    @property
    def kv_bytes(self) -> int:
        return self.worker.kv_bytes

    def status(self) -> str:
        """A short note for progress lines (nothing for a single engine)."""
        return ""

    # -- the stepping interface ---------------------------------------------------------------
    def add_requests(
        self, requests: Iterable[Request] | RequestSource, plan: Plan | None = None
    ) -> None:
        """Queue a batch: requests, or a ``RequestSource`` that makes them on demand.
        ``request.index`` is the request's id (unique among unfinished ones). Under a planning
        policy ``plan`` is the batch's plan (``plan`` indices are positions in the batch);
        without one the batch is planned here.

        Raises ValueError for an id already in flight or given twice."""
        source = requests if isinstance(requests, RequestSource) else RequestList(list(requests))
        if not len(source):
            return
        ids = source.request_ids()
        busy = np.fromiter(self._requests, np.int64, len(self._requests))
        busy = np.concatenate([busy, self._pending.waiting_ids()])
        clash = ids[np.isin(ids, busy)]
        if len(clash) or len(np.unique(ids)) != len(ids):
            first = int(clash[0]) if len(clash) else None
            raise ValueError(f"request id {first} is already in flight (ids must be unique)")
        kinds = {p.embedding is not None for p in source.distinct_params()}
        if len(kinds) > 1 or (self.has_unfinished() and kinds != {self._embeds}):
            raise ValueError("embedding and generation requests cannot be in flight together")
        self._embeds = kinds.pop()
        if self.config.policy.plans and plan is None:
            plan = make_plan(source.prompt_tokens(), source.max_tokens(), self.config.block_size)
        stream = WorkStream(
            source,
            self.config.policy,
            self.config.block_size,
            self.config.seed,
            plan if self.config.policy.plans else None,
            self._group_ids,
        )
        self._pending.add(ids, iter(stream))
        self.stats.requests += len(source)
        self.stats.prompt_tokens += int(source.lengths.sum())
        self._refill()

    def _refill(self) -> None:
        """Hand the scheduler the next sequences of the added batches, up to the window."""
        for requests, seqs in self._pending.take(self.scheduler, self.admission):
            for _, request in requests:
                self._requests[request.index] = request
                self._scoring += request.params.prompt_logprobs is not None
            for seq in seqs:
                if seq.leads is None:
                    self._sequences.setdefault(seq.seq_id, []).append(seq)
                else:
                    self.stats.groups += 1
                self.scheduler.add(seq)
            for _, request in requests:
                if request.index in self._doomed:
                    self._doomed.discard(request.index)
                    self.abort(request.index)

    def add_request(self, request: Request) -> None:
        """Queue one request (planned on its own)."""
        self.add_requests([request])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None or bool(self._pending)

    def abort(self, request_id: int) -> bool:
        """Drop an unfinished request (all its choices) and free its KV blocks; False if it is
        not in flight. Its output is never returned. A request whose turn has not come yet is
        dropped when it does."""
        seqs = self._sequences.pop(request_id, None)
        if seqs is None:
            if request_id in self._doomed:
                return False
            waiting = self._pending.holds(request_id)
            if waiting:
                self._doomed.add(request_id)
            return waiting
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self.scheduler.abort(seq)
            self._texts.discard(seq)
            self.pooler.forget(seq)
        self._finished.pop(request_id, None)
        self._scoring -= self._requests.pop(request_id).params.prompt_logprobs is not None
        return True

    def step(self) -> list[RequestOutput]:
        """Run one forward step; the outputs of the requests that finished in it.

        With overlap scheduling (``EngineConfig.overlap_schedule``, on by default on CUDA) the
        step is launched first and the previous step's tokens are taken in while it runs
        (SGLang's overlap scheduler): the outputs are those the previous step finished, and a
        request that ended there computed one more token in this step, which is dropped.

        A request whose own work fails (its grammar, penalties, sampling, log-probabilities,
        prompt scoring, text) ends with ``RequestOutput.error`` and its blocks are freed; the
        others go on. Raises ``KVBudgetError`` when nothing can be scheduled (the pool holds no
        request; nothing is raised when the rest of the batch was aborted before its turn); a
        fault that is not one request's (the forward pass, memory, the device) propagates."""
        self._refill()
        scheduler = self.scheduler
        computed, preempted = scheduler.prefill_tokens_computed, scheduler.num_preemptions
        hits = self.blocks.cache_hits
        previous, self._inflight = self._inflight, None
        finished: list[Sequence] = []
        failed: list[RequestOutput] = []
        drained = False
        if previous is not None and previous.sampled.plan.masks is not None:
            # Its structured requests' next grammar masks are filled from its tokens.
            finished += self._complete(previous, failed)
            previous, drained = None, True
        step = scheduler.schedule()
        launched = None
        embedded: list[RequestOutput] = []
        if step.seqs and self._embeds:  # no token to sample: nothing is left in flight
            embedded = self._embed(step)
        elif step.seqs:
            launched = self._launch(step, previous)
        elif previous is None and not drained and scheduler.has_work:
            raise KVBudgetError(
                "the KV cache is too small to make progress; raise --kv-cache-memory"
            )
        if previous is not None:
            finished += self._complete(previous, failed)
        if launched is not None and self.overlap:
            self._inflight = launched
        elif launched is not None:
            finished += self._complete(launched, failed)
        self.stats.steps += bool(step.seqs)
        self.stats.prefill_tokens_computed += scheduler.prefill_tokens_computed - computed
        self.stats.preemptions += scheduler.num_preemptions - preempted
        self.stats.cache_hit_tokens += (self.blocks.cache_hits - hits) * self.config.block_size
        faults: Faults[Sequence] = Faults()
        outputs = []
        for seq in finished:
            if seq.seq_id in self._requests:  # not failed since it finished
                out = faults.guard("output", seq, self._output, seq, faults)
                if out is not None:
                    outputs.append(out)
        return failed + outputs + embedded + self._fail(faults)

    def _embed(self, step: ScheduledStep) -> list[RequestOutput]:
        """Run a step of embedding requests: the final-norm hidden states of the rows pooling
        reads, pooled (``execution/pooler.py``); the requests it completes end at once, their
        blocks freed, with their embeddings (``PoolingConfig.finish``), or for score requests
        their scores (the score head's logit, ``ScoreConfig.activate``)."""
        with torch.inference_mode():
            hidden, _ = self.runner.execute(step, self.pooler.every_row(step), hidden=True)
            pooled = self.pooler.pool(step, hidden)
            states = torch.stack([v for _, v in pooled]) if pooled else None
            logits = None
            if states is not None and self.score_head is not None:
                scored = [j for j, (seq, _) in enumerate(pooled) if seq.params.score is not None]
                if scored:  # the score head on the scored requests' states
                    logits = dict(zip(scored, self.score_head(states[scored]).tolist()))
            vectors = states.cpu().numpy() if states is not None else ()
        self.scheduler.advance(step)
        outputs = []
        for j, ((seq, _), vector) in enumerate(zip(pooled, vectors)):
            request = self._requests.pop(seq.seq_id)
            self.scheduler.finish(seq, "stop", seq.num_prompt - 1)
            self._sequences.pop(seq.seq_id, None)
            params = request.params
            assert params.embedding is not None
            ids = request.prompt_list()
            if params.score is not None:
                assert logits is not None, "a score request on a model that cannot score"
                score = self.limits.scoring.activate(logits[j], params.score)
                outputs.append(RequestOutput(request.index, ids, [], score=score))
            else:
                embedding = self.limits.pooling.finish(vector, params.embedding)
                outputs.append(RequestOutput(request.index, ids, [], embedding=embedding))
        return outputs

    def _launch(self, step: ScheduledStep, previous: _InFlight | None) -> _InFlight:
        """Run a scheduled step up to its sampled tokens on the device (the previous step's
        tokens, when not taken in yet, are read there) and advance the scheduler."""
        sampling = step.receivers
        plan = self.sampler.prepare(sampling)  # grammar masks fill during the forward pass
        scoring = []
        if self._scoring:  # some request in flight asks for prompt log-probabilities
            scoring = [i for i, s in enumerate(step.seqs) if _scores_prompt(s)]
        before = None if previous is None else previous.sampled.tokens
        faults: Faults[Sequence] = Faults()
        with torch.inference_mode():  # the runner's logits are inference tensors
            if not scoring and self.sampler.reads_hidden(plan):  # greedy: no logits needed
                hidden, _ = self.runner.execute(step, (), plan.arrays, before, hidden=True)
                sampled = self.sampler.sample_hidden(hidden, plan)
            else:
                logits, tensors = self.runner.execute(step, scoring, plan.arrays, before)
                if scoring:
                    self._score_prompts(step, scoring, logits[len(sampling) :], faults)
                    logits = logits[: len(sampling)]
                sampled = self.sampler.sample_async(logits, plan, tensors)
        # Placeholders only where the next step is scheduled before these tokens are in.
        self.scheduler.advance(step, placeholders=self.overlap)
        return _InFlight(step, sampled, faults)

    def _complete(self, launched: _InFlight, failed: list[RequestOutput]) -> list[Sequence]:
        """Take a launched step's tokens in: stop checks, stop strings; the finished. The
        requests that failed in the step end first (their outputs go to ``failed``)."""
        tokens = self.sampler.collect(launched.sampled)
        self.stats.sampled_tokens += len(tokens)
        faults, plan = launched.faults, launched.sampled.plan
        for row, message in plan.faults.errors.items():
            faults.fail(plan.seqs[row], message)
        failed += self._fail(faults)  # before the stop checks: those skip aborted sequences
        finished, (got, where) = self.scheduler.resolve(launched.step, tokens)
        if plan.masks is not None:  # a complete grammar ends its request
            finished += self._end_grammars(got, where)
        finished += self._texts.update(got, where, self.scheduler.finish, faults)
        failed += self._fail(faults)
        return finished

    def _end_grammars(self, got: list[Sequence], where: list[int]) -> list[Sequence]:
        """Finish the structured sequences whose grammar accepted a stop token, also under
        ``ignore_eos`` (nothing can follow a complete grammar)."""
        ended = []
        for seq, at in zip(got, where):
            if (
                seq.params.structured is not None
                and seq.status is not Status.FINISHED
                and self.sampler.grammar_ended(seq)
            ):
                self.scheduler.finish(seq, "stop", seq.num_prompt + at)
                ended.append(seq)
        return ended

    def _fail(self, faults: Faults[Sequence]) -> list[RequestOutput]:
        """End the requests of ``faults``' sequences not ended yet (every choice, its blocks
        freed); their outputs carry the error. Fault entries are consumed."""
        outputs = []
        for seq, message in faults.errors.items():
            request = self._requests.get(seq.seq_id)
            if request is None or not self.abort(seq.seq_id):
                continue
            log.warning("request %d failed: %s", request.index, message)
            outputs.append(RequestOutput(request.index, request.prompt_list(), [], error=message))
        faults.errors.clear()
        return outputs

    def generate(
        self,
        requests: Iterable[Request],
        plan: Plan | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[RequestOutput]:
        """Run a batch to completion, yielding each output as soon as it finishes; ``stats``
        then holds this batch's counters. ``should_stop()`` is asked before every step: when it
        says True the unfinished requests are aborted and the generator ends. However the
        generator ends (done, stopped, closed early, or an exception), the engine is idle
        afterwards: what is unfinished is aborted and its blocks freed."""
        if self.has_unfinished():
            raise RuntimeError("generate needs an idle engine; drive step() instead")
        self.stats = EngineStats()
        self.add_requests(requests, plan)
        try:
            while self.has_unfinished():
                if should_stop is not None and should_stop():
                    return
                yield from self.step()
        finally:
            self._pending.clear()
            self._doomed.clear()
            for request_id in list(self._sequences):
                self.abort(request_id)
            self._inflight = None  # every request of the step in flight is aborted

    def _score_prompts(
        self,
        step: ScheduledStep,
        scoring: list[int],
        logits: torch.Tensor,
        faults: Faults[Sequence],
    ) -> None:
        """Hand each scoring sequence the logits of its chunk (rows in ``scoring`` order)."""
        row = 0
        for i in scoring:
            seq, n = step.seqs[i], step.num_tokens[i]
            chunk = logits[row : row + n]
            faults.guard(
                "prompt logprobs", seq, self.sampler.score_prompt, seq, seq.computed, chunk
            )
            row += n

    # -- outputs ------------------------------------------------------------------------------
    def _output(self, seq: Sequence, faults: Faults[Sequence]) -> RequestOutput | None:
        """Record a finished choice; the request's output once all its choices have ended (the
        request is forgotten only once its output is built; a text that cannot be decoded is
        recorded in ``faults``)."""
        done = self._finished.setdefault(seq.seq_id, [])
        done.append(seq)
        request = self._requests[seq.seq_id]
        if len(done) < request.params.n:
            return None
        done.sort(key=lambda s: s.choice)
        texts = [faults.guard("detokenizing", s, self._texts.pop, s) for s in done]
        if any(s in faults for s in done):
            return None
        wants = request.params.logprobs is not None
        choices = [
            CompletionOutput(
                s.choice,
                s.output_tokens,
                text or "",
                s.finish_reason or "stop",
                self.sampler.logprobs(s) if wants else None,
            )
            for s, text in zip(done, texts)
        ]
        scored = request.params.prompt_logprobs is not None
        out = RequestOutput(
            request.index,
            request.prompt_list(),
            choices,
            sum(s.preemptions for s in done),
            self.sampler.prompt_logprobs(done[0]) if scored else None,
            cached_tokens=min(s.cached if s.cached >= 0 else s.shared_len for s in done),
        )
        del self._requests[seq.seq_id], self._finished[seq.seq_id]
        self._scoring -= request.params.prompt_logprobs is not None
        self._sequences.pop(seq.seq_id, None)
        self.stats.output_tokens += out.num_output_tokens
        return out


@dataclass(frozen=True)
class _InFlight:
    """A launched step whose tokens are not taken in yet."""

    step: ScheduledStep
    sampled: SampledTokens
    faults: Faults[Sequence]  # the step's requests that failed before its tokens were taken in


def _scores_prompt(seq: Sequence) -> bool:
    """Whether this step's chunk of ``seq`` yields prompt log-probabilities (choice 0 of a
    request that asks for them, while prompt tokens 1.. are still unscored)."""
    return (
        seq.params.prompt_logprobs is not None
        and seq.leads is None
        and seq.choice == 0
        and seq.computed < seq.num_prompt - 1
    )
