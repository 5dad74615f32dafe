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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import EngineConfig
from .detokenizer import OutputTexts
from .errors import KVBudgetError
from .execution.attention.backend import AttentionBackend
from .execution.step_sampler import StepSampler
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
            SchedulerConfig(config.max_num_batched_tokens, cap, self.limits.max_model_len),
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
            self.limits.vocab_size, self.eos_ids, self._grammars, self.worker.argmax
        )
        self.stats = EngineStats()
        self.admission = AdmissionWindow.for_budget(config.max_num_batched_tokens)
        self._pending = PendingBatches()  # added, not yet fully admitted
        self._doomed: set[int] = set()  # aborted before their sequences were made
        self._requests: dict[int, Request] = {}  # unfinished requests by id
        self._sequences: dict[int, list[Sequence]] = {}  # a request's choices by request id
        self._finished: dict[int, list[Sequence]] = {}  # choices that ended, by request id
        self._texts = OutputTexts(self.tokenizer.hf, self._requests)  # incremental detokenizers
        self._group_ids = itertools.count()  # unique among the engine's levels

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
        if self.config.policy.plans and plan is None:
            prompts = [source.request(i).prompt_token_ids for i in range(len(source))]
            plan = make_plan(
                prompts,
                [source.params(i).max_tokens for i in range(len(source))],
                self.config.block_size,
            )
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
        return self.scheduler.has_work or bool(self._pending)

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
            self._texts.pop(seq)
        self._finished.pop(request_id, None)
        del self._requests[request_id]
        return True

    def step(self) -> list[RequestOutput]:
        """Run one forward step; the outputs of the requests that finished in it.

        Raises ``KVBudgetError`` when nothing can be scheduled (the pool holds no request)."""
        self._refill()
        scheduler = self.scheduler
        if not scheduler.has_work:  # the rest of the batch was aborted before its turn
            return []
        computed, preempted = scheduler.prefill_tokens_computed, scheduler.num_preemptions
        hits = self.blocks.cache_hits
        step = scheduler.schedule()
        if not step.seqs:
            raise KVBudgetError(
                "the KV cache is too small to make progress; raise --kv-cache-memory"
            )
        sampling = [receiver for _, receiver in step.samples]
        pending = self.sampler.prepare(sampling)  # grammar masks fill during the forward pass
        scoring = [i for i, s in enumerate(step.seqs) if _scores_prompt(s)]
        with torch.inference_mode():  # the runner's logits are inference tensors
            logits = self.runner.execute(step, scoring)
            if scoring:
                self._score_prompts(step, scoring, logits[len(sampling) :])
                logits = logits[: len(sampling)]
            tokens = self.sampler.sample(logits, sampling, pending)
        finished = scheduler.postprocess(step, tokens)
        finished += self._texts.update(sampling, scheduler.finish)
        self.stats.steps += 1
        self.stats.sampled_tokens += len(tokens)
        self.stats.prefill_tokens_computed += scheduler.prefill_tokens_computed - computed
        self.stats.preemptions += scheduler.num_preemptions - preempted
        self.stats.cache_hit_tokens += (self.blocks.cache_hits - hits) * self.config.block_size
        return [out for seq in finished if (out := self._output(seq)) is not None]

    def generate(
        self,
        requests: Iterable[Request],
        plan: Plan | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[RequestOutput]:
        """Run a batch to completion, yielding each output as soon as it finishes; ``stats``
        then holds this batch's counters. ``should_stop()`` is asked before every step: when it
        says True the unfinished requests are aborted and the generator ends."""
        if self.has_unfinished():
            raise RuntimeError("generate needs an idle engine; drive step() instead")
        self.stats = EngineStats()
        self.add_requests(requests, plan)
        while self.has_unfinished():
            if should_stop is not None and should_stop():
                self._pending.clear()
                self._doomed.clear()
                for request_id in list(self._sequences):
                    self.abort(request_id)
                return
            yield from self.step()

    def _score_prompts(self, step: ScheduledStep, scoring: list[int], logits: torch.Tensor) -> None:
        """Hand each scoring sequence the logits of its chunk (rows in ``scoring`` order)."""
        row = 0
        for i in scoring:
            seq, n = step.seqs[i], step.num_tokens[i]
            self.sampler.score_prompt(seq, seq.computed, logits[row : row + n])
            row += n

    # -- outputs ------------------------------------------------------------------------------
    def _output(self, seq: Sequence) -> RequestOutput | None:
        """Record a finished choice; the request's output once all its choices have ended."""
        self.stats.output_tokens += seq.num_output
        done = self._finished.setdefault(seq.seq_id, [])
        done.append(seq)
        request = self._requests[seq.seq_id]
        if len(done) < request.params.n:
            return None
        del self._requests[seq.seq_id], self._finished[seq.seq_id]
        self._sequences.pop(seq.seq_id, None)
        done.sort(key=lambda s: s.choice)
        wants = request.params.logprobs is not None
        choices = [
            CompletionOutput(
                s.choice,
                s.output_tokens,
                self._texts.pop(s),
                s.finish_reason or "stop",
                self.sampler.logprobs(s) if wants else None,
            )
            for s in done
        ]
        scored = request.params.prompt_logprobs is not None
        return RequestOutput(
            request.index,
            request.prompt_token_ids,
            choices,
            sum(s.preemptions for s in done),
            self.sampler.prompt_logprobs(done[0]) if scored else None,
        )


def _scores_prompt(seq: Sequence) -> bool:
    """Whether this step's chunk of ``seq`` yields prompt log-probabilities (choice 0 of a
    request that asks for them, while prompt tokens 1.. are still unscored)."""
    return (
        seq.params.prompt_logprobs is not None
        and seq.leads is None
        and seq.choice == 0
        and seq.computed < seq.num_prompt - 1
    )
