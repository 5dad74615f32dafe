"""A batch job: batch file in, answers out, every request answered exactly once.

Whole-job problems raise ``JobError`` before any compute; problems of single lines become error
records while every other request runs, and so does a request that fails while it is served
(code ``server_error``, the engine's message). A fault that is not one request's (the model's
forward pass, memory, the device) stops the job with every finished answer on disk. Ctrl-C /
SIGTERM raise ``JobInterrupted`` after the answers finished so far are on disk. See
``results.py`` for the resume rule.

The batch is read once into a compact store (``ingest.py``: token arrays, not objects), planned
on its arrays, and streamed into the engine in the plan's order; a ``Request`` exists only while
it runs. The CLI tokenizes before loading the weights, so a job whose answers are all on disk
loads nothing but its output's index.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..batch_tokenizer import BatchTokenizer
from ..chat.render import ChatOptions
from ..config import EngineConfig
from ..engine import EngineStats, LLMEngine
from ..errors import InputFileError, JobInterrupted
from ..io.batch_file import BatchRequest, LineError
from ..io.embedding_format import embedding_line
from ..io.embedding_request import EMBEDDINGS_URL
from ..io.line_parts import LineParts
from ..io.progress import PlannedWork, Progress
from ..io.results import SERVER_ERROR, ResultWriter, error_record, success_record
from ..io.score_format import score_line
from ..loading.model_config import read_model_config
from ..loading.model_source import DEFAULT_MODEL_NAME, resolve_model
from ..planning.plan import Plan, make_plan
from ..planning.report import count
from ..scheduling.request_source import CompactRequests
from ..tokenizer import Tokenizer
from .batch_store import BatchStore
from .ingest import ingest
from .validate import check

if TYPE_CHECKING:
    from ..distributed.ray_executor import RayExecutor

log = logging.getLogger(__name__)

LISTED = 10  # failed lines named in a summary before the rest are counted


@dataclass(frozen=True)
class JobOptions:
    input: Path
    output: Path
    overwrite: bool = False  # start over instead of resuming an existing output file
    default_max_tokens: int = 256
    quiet: bool = False
    workers: int = 1  # > 1, or a ray_address: engine actors on Ray
    ray_address: str | None = None
    chat: ChatOptions = ChatOptions()  # chat template and tool-call / reasoning parsers


@dataclass(frozen=True)
class JobSummary:
    """Counts of one run; ``requests_ok + requests_failed + skipped`` is the input's lines."""

    requests_ok: int  # answered by this run
    requests_failed: int  # error records (every line with an error, every run)
    skipped: int  # answered by an earlier run (same custom_id and request)
    prompt_tokens: int
    output_tokens: int
    prefill_tokens_saved: int
    preemptions: int
    wall_s: float
    compute_s: float = 0.0  # from the first engine step: no reading, loading or planning
    failures: tuple[str, ...] = ()  # the first LISTED error messages, in line order

    def lines(self) -> list[str]:
        # prefill-only work (embeddings, scores) is priced by its prompt tokens
        kind = "output" if self.output_tokens else "prompt"
        done = self.output_tokens or self.prompt_tokens
        tps = done / self.compute_s if self.compute_s else 0.0
        rate = f": {tps:.1f} {kind} tok/s" if done else " (nothing computed)"
        lines = [
            f"requests: {self.requests_ok} ok, {self.requests_failed} failed, "
            f"{self.skipped} already answered",
            *listed("failed", self.failures, self.requests_failed),
            f"tokens: {self.prompt_tokens} prompt, {self.output_tokens} output, "
            f"{self.prefill_tokens_saved} prefill tokens saved by sharing",
            f"preemptions: {self.preemptions}",
            f"wall time: {self.wall_s:.1f}s, of which computing {self.compute_s:.1f}s{rate}",
        ]
        if not self.requests_ok and not self.skipped:
            lines.insert(0, "no line of the input is a valid request: see the error records")
        return lines


def listed(label: str, messages: Sequence[str], total: int) -> list[str]:
    """``label: message`` lines for the first ``LISTED`` of ``messages`` (each names its line
    and reason), then how many more there are of ``total``."""
    lines = [f"{label}: {m}" for m in messages[:LISTED]]
    if total > len(lines):
        lines.append(f"{label}: ... and {total - len(lines)} more (each has an error record)")
    return lines


def make_executor(
    config: EngineConfig,
    workers: int = 1,
    ray_address: str | None = None,
    start: float | None = None,
) -> LLMEngine | RayExecutor:
    """One in-process engine, or engine actors on Ray for ``--workers`` / ``--ray-address``;
    logs the loading and the seconds since ``start`` (``time.monotonic()``, default now)."""
    start = time.monotonic() if start is None else start
    log.info("loading the model (%s)", config.model or f"default: {DEFAULT_MODEL_NAME}")
    if workers > 1 or ray_address:
        from ..distributed.ray_executor import RayExecutor

        executor: LLMEngine | RayExecutor = RayExecutor(config, max(1, workers), ray_address)
    else:
        executor = LLMEngine(config)
    log.info("model loaded after %.1fs", time.monotonic() - start)
    return executor


def run_job(config: EngineConfig, opts: JobOptions) -> JobSummary:
    """Run the batch file ``opts.input`` into ``opts.output``; see the module docstring."""
    start = time.monotonic()
    if opts.input.resolve() == opts.output.resolve():
        raise InputFileError(
            "the output file must not be the input file (-o names where answers go)"
        )
    config.torch_device  # noqa: B018  an unavailable device fails here, before any message

    def tokenizer() -> BatchTokenizer:
        source = resolve_model(config.model)
        read_model_config(source)  # an unsupported model fails here, before any reading
        log.info("reading and tokenizing %s", opts.input)
        return BatchTokenizer(Tokenizer(source.path))

    def load() -> LLMEngine | RayExecutor:
        return make_executor(config, opts.workers, opts.ray_address, start)

    return run_batch(load, opts, start=start, tokenizer=tokenizer, config=config)


def run_batch(
    load: Callable[[], LLMEngine | RayExecutor],
    opts: JobOptions,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    start: float | None = None,
    tokenizer: Callable[[], BatchTokenizer] | None = None,
    config: EngineConfig | None = None,
) -> JobSummary:
    """Answer the batch file ``opts.input`` into ``opts.output``, resuming it (the CLI's job
    and the server's batches). ``load()`` gives the executor; it is called only when something
    is left to answer. ``tokenizer()`` gives the tokenizer to read the file with (default: the
    executor's, so ``load()`` comes first). ``config``: the executor's configuration when it is
    known before loading; the batch is then planned before the model and its KV pool take
    their memory.

    ``should_stop()`` is checked between engine steps: when it returns True the unfinished
    requests are dropped, the answers so far are on disk, and the call returns (a later call
    resumes). ``on_progress(completed, failed, total)`` gets counts over all lines (earlier
    answers included) after the error records and after each answer. Ctrl-C raises
    ``JobInterrupted`` once the finished answers are flushed. Raises ``InputFileError`` when
    the input is missing or empty.
    """
    start = time.monotonic() if start is None else start
    writer = ResultWriter(opts.output, resume=not opts.overwrite)
    engine: LLMEngine | RayExecutor | None = None

    def read_with() -> BatchTokenizer:
        nonlocal engine
        if tokenizer is not None:
            return tokenizer()
        engine = load()
        return BatchTokenizer(engine.tokenizer)

    stats, answered, skipped, total, compute_s = EngineStats(), 0, 0, 0, 0.0
    errors: dict[int, LineError] = {}
    progress: Progress | None = None
    try:
        batch = ingest(opts.input, opts.default_max_tokens, read_with, writer.answered, opts.chat)
        store, errors, skipped, total = batch.store, batch.errors, batch.skipped, batch.lines
        log.info("read %d lines after %.1fs", total, time.monotonic() - start)
        if skipped:
            log.info("%d of %d requests already answered in %s", skipped, total, opts.output)

        def report() -> None:
            if on_progress is not None:
                on_progress(skipped + answered, len(errors), total)

        requests, plan = store.runnable(), None
        if len(requests):
            if config is None:
                engine = engine or load()
                config = engine.config
            plan = _plan(requests, config)
            engine = engine or load()
            requests, plan = _check(requests, plan, engine, store, errors)
        for line in sorted(errors):
            writer.write(error_record(errors[line]))
        report()
        if len(requests):
            assert engine is not None
            progress = Progress(
                len(requests), opts.quiet, start=start, planned=_planned(requests, plan)
            )
            model_name = engine.model_name
            used = [requests.param_sets[i] for i in np.unique(requests.param_ids).tolist()]
            vocab = None
            decode = partial(engine.tokenizer.hf.decode, skip_special_tokens=False)
            if any(p.logprobs is not None or p.prompt_logprobs is not None for p in used):
                vocab = engine.tokenizer.token_bytes(engine.limits.vocab_size)
            computing = time.monotonic()
            lines = LineParts()  # embedding inputs and score pairs, by line
            for part, part_plan in by_kind(requests, plan):
                # closing(): however the loop ends, the engine aborts what is unfinished (idle)
                with closing(engine.generate(part, part_plan, should_stop)) as outputs:
                    for out in outputs:
                        req = store.info(out.index)
                        if req.line in errors:  # another input of its embedding line failed
                            pass
                        elif out.error is not None:  # this request failed while it was served
                            message = f"line {req.line}: {out.error}"
                            failed = LineError(req.line, req.custom_id, message, SERVER_ERROR)
                            errors[req.line] = failed
                            lines.drop(req.line)
                            writer.write(error_record(failed))
                        elif req.url == EMBEDDINGS_URL or req.params.score is not None:
                            parts = lines.add(req, out)
                            if parts is not None:
                                embeds = req.url == EMBEDDINGS_URL
                                record = (embedding_line if embeds else score_line)(
                                    parts, model_name
                                )
                                writer.write(record)
                                answered += 1
                        else:
                            echoed = _prompt_text(engine.tokenizer, req, out.prompt_token_ids)
                            record = success_record(req, out, model_name, vocab, echoed, decode)
                            writer.write(record)
                            answered += 1
                        work = (engine.stats.prefill_tokens_computed, engine.stats.sampled_tokens)
                        progress.update(1, out.num_output_tokens, engine.status(), work)
                        report()
                stats.add(engine.stats)
            compute_s = time.monotonic() - computing
        writer.finish(store.lines, store.keys, errors)  # also after a stop: the answers so far
    except KeyboardInterrupt:
        if not total:  # still reading: nothing to resume yet
            raise
        raise JobInterrupted(skipped + answered, total - len(errors), len(errors)) from None
    finally:
        if progress is not None:
            progress.close()
        writer.close()
    return JobSummary(
        requests_ok=answered,
        requests_failed=len(errors),
        skipped=skipped,
        prompt_tokens=stats.prompt_tokens,
        output_tokens=stats.output_tokens,
        prefill_tokens_saved=stats.prefill_tokens_saved,
        preemptions=stats.preemptions,
        wall_s=time.monotonic() - start,
        compute_s=compute_s,
        failures=tuple(errors[line].message for line in sorted(errors)[:LISTED]),
    )


def _plan(requests: CompactRequests, config: EngineConfig) -> Plan | None:
    """The batch's plan under a planning policy (Ray cuts other policies' chunks by its own)."""
    if not config.policy.plans:
        return None
    log.info("planning the %s read", count(len(requests), "request"))
    return make_plan(requests.prompts, requests.max_tokens(), config.block_size)


def _check(
    requests: CompactRequests,
    plan: Plan | None,
    engine: LLMEngine | RayExecutor,
    store: BatchStore,
    errors: dict[int, LineError],
) -> tuple[CompactRequests, Plan | None]:
    """The requests that fit the engine, with their share of ``plan``; the others' errors go
    into ``errors``. A request the KV pool cannot hold is a line error like any other, even
    when no request fits: which lines fail never depends on which are already answered (a
    pool too small for any request, one that holds no block, fails when it is sized)."""
    checked = check(requests, engine.limits, store.info, store.explicit[requests.ids])
    log.info(
        "%s read, %d rejected by the checks against the model, %d to run",
        count(len(requests), "request"), len(requests) - len(checked.runnable),
        len(checked.runnable),
    )  # fmt: skip
    errors.update((e.line, e) for e in checked.errors)
    if plan is not None and checked.kept is not None:
        plan = plan.subset(checked.kept)
    return checked.runnable, plan


def by_kind(
    requests: CompactRequests, plan: Plan | None
) -> list[tuple[CompactRequests, Plan | None]]:
    """The batch as the engine runs it: its generation requests, then its embedding requests
    (an engine holds one kind at a time), each with its share of ``plan``."""
    embeds = np.array([p.embedding is not None for p in requests.param_sets], bool)
    kind = embeds[requests.param_ids] if len(embeds) else np.zeros(0, bool)
    if kind.all() or not kind.any():
        return [(requests, plan)]
    parts = []
    for positions in (np.flatnonzero(~kind), np.flatnonzero(kind)):
        parts.append((requests.take(positions), None if plan is None else plan.subset(positions)))
    return parts


def _planned(requests: CompactRequests, plan: Plan | None) -> PlannedWork:
    """The prefill tokens the run computes and the most output tokens it can sample (none
    for embedding requests)."""
    choices = np.array([p.sampled_choices for p in requests.param_sets], dtype=np.int64)[
        requests.param_ids
    ]
    prefill = plan.computed_prefill_tokens if plan is not None else requests.prompts.num_tokens
    return PlannedWork(prefill, int((requests.max_tokens() * choices).sum()))


def _prompt_text(tokenizer: Tokenizer, req: BatchRequest, ids: list[int]) -> str:
    """The prompt as ``echo`` returns it (the text as sent, or the token ids decoded); empty
    without ``echo``."""
    if not req.echo:
        return ""
    return req.prompt if isinstance(req.prompt, str) else tokenizer.hf.decode(ids)
