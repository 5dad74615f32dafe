"""A batch job: batch file in, answers out, every request answered exactly once.

Whole-job problems raise ``JobError`` before any compute; problems of single lines become error
records while every other request runs, and so does a request that fails while it is served
(code ``server_error``, the engine's message). A fault that is not one request's (the model's
forward pass, memory, the device) stops the job with every finished answer on disk. Ctrl-C /
SIGTERM raise ``JobInterrupted`` after the answers finished so far are on disk. See
``results.py`` for the resume rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat.render import ChatOptions
from ..config import EngineConfig
from ..engine import EngineStats, LLMEngine
from ..errors import InputFileError, JobInterrupted, KVBudgetError
from ..io.batch_file import BatchRequest, LineError, read_batch_file
from ..io.progress import Progress
from ..io.results import SERVER_ERROR, ResultWriter, error_record, success_record
from ..loading.model_source import DEFAULT_MODEL_NAME
from ..outputs import Request
from ..planning.plan import make_plan
from ..planning.report import count
from ..tokenizer import Tokenizer
from .validate import validate

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
    failures: tuple[str, ...] = ()  # the first LISTED error messages, in line order

    def lines(self) -> list[str]:
        tps = self.output_tokens / self.wall_s if self.wall_s else 0.0
        lines = [
            f"requests: {self.requests_ok} ok, {self.requests_failed} failed, "
            f"{self.skipped} already answered",
            *listed("failed", self.failures, self.requests_failed),
            f"tokens: {self.prompt_tokens} prompt, {self.output_tokens} output, "
            f"{self.prefill_tokens_saved} prefill tokens saved by sharing",
            f"preemptions: {self.preemptions}",
            f"wall time: {self.wall_s:.1f}s, {tps:.1f} output tok/s",
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


def read_items(path: Path, default_max_tokens: int) -> list[BatchRequest | LineError]:
    """Every non-blank line of the input; JobError when it is missing or has no line."""
    if not path.is_file():
        raise InputFileError(f"input file not found: {path}")
    items = list(read_batch_file(path, default_max_tokens))
    if not items:
        raise InputFileError(f"the input file {path} is empty: it has no request lines")
    return items


def make_executor(
    config: EngineConfig, workers: int = 1, ray_address: str | None = None
) -> LLMEngine | RayExecutor:
    """One in-process engine, or engine actors on Ray for ``--workers`` / ``--ray-address``."""
    if workers > 1 or ray_address:
        from ..distributed.ray_executor import RayExecutor

        return RayExecutor(config, max(1, workers), ray_address)
    return LLMEngine(config)


def run_job(config: EngineConfig, opts: JobOptions) -> JobSummary:
    """Run the batch file ``opts.input`` into ``opts.output``; see the module docstring."""
    start = time.monotonic()
    if opts.output.resolve() == opts.input.resolve():
        raise InputFileError(
            "the output file must not be the input file (-o names where answers go)"
        )
    items = read_items(opts.input, opts.default_max_tokens)
    config.torch_device  # noqa: B018  an unavailable device fails here, before any message

    def load() -> LLMEngine | RayExecutor:
        log.info("loading the model (%s)", config.model or f"default: {DEFAULT_MODEL_NAME}")
        engine = make_executor(config, opts.workers, opts.ray_address)
        log.info("model loaded after %.1fs", time.monotonic() - start)
        return engine

    return run_batch(load, items, opts, start=start)


def run_batch(
    load: Callable[[], LLMEngine | RayExecutor],
    items: list[BatchRequest | LineError],
    opts: JobOptions,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    start: float | None = None,
) -> JobSummary:
    """Answer the batch file's ``items`` into ``opts.output``, resuming it (the CLI's job and
    the server's batches). ``load()`` gives the executor; it is called only when something is
    left to answer.

    ``should_stop()`` is checked between engine steps: when it returns True the unfinished
    requests are dropped, the answers so far are on disk, and the call returns (a later call
    resumes). ``on_progress(completed, failed, total)`` gets counts over
    all ``items`` (earlier answers included) after the error records and after each answer.
    Ctrl-C raises ``JobInterrupted`` once the finished answers are flushed.
    """
    start = time.monotonic() if start is None else start
    writer = ResultWriter(opts.output, resume=not opts.overwrite)
    requests = [i for i in items if isinstance(i, BatchRequest)]
    todo = [r for r in requests if not writer.answered.covers(r)]
    errors = {i.line: i for i in items if isinstance(i, LineError)}
    skipped = len(requests) - len(todo)
    if skipped:
        log.info("%d of %d requests already answered in %s", skipped, len(items), opts.output)
    stats, answered = EngineStats(), 0
    progress: Progress | None = None

    def report() -> None:
        if on_progress is not None:
            on_progress(skipped + answered, len(errors), len(items))

    try:
        runnable = []
        if todo:
            engine = load()
            log.info("checking %s", count(len(todo), "request"))
            checked = validate(engine.tokenizer, engine.limits, todo, opts.chat)
            if checked.too_big_for_kv and not checked.runnable:
                raise KVBudgetError(
                    f"the KV cache ({engine.limits.num_blocks} blocks) is too small for even one "
                    "request; raise --kv-cache-memory"
                )
            errors.update((e.line, e) for e in checked.errors)
            runnable = checked.runnable
        for line in sorted(errors):
            writer.write(error_record(errors[line]))
        report()
        if runnable:
            progress = Progress(len(runnable), quiet=opts.quiet, start=start)
            model_name = engine.model_name
            batch = [Request(i, ids, req.params) for i, (req, ids) in enumerate(runnable)]
            plan = None  # only a planning policy reads it (Ray cuts fcfs chunks by its own)
            if engine.config.policy.plans:
                plan = make_plan(
                    [ids for _, ids in runnable],
                    [r.params.max_tokens for r, _ in runnable],
                    engine.config.block_size,
                )
            vocab = None
            if any(
                r.params.logprobs is not None or r.params.prompt_logprobs is not None for r in batch
            ):
                vocab = engine.tokenizer.token_bytes(engine.limits.vocab_size)
            # closing(): however the loop ends, the engine aborts what is unfinished (idle)
            with closing(engine.generate(batch, plan, should_stop)) as outputs:
                for out in outputs:
                    req, ids = runnable[out.index]
                    if out.error is not None:  # this request failed while it was served
                        failed = LineError(
                            req.line, req.custom_id, f"line {req.line}: {out.error}", SERVER_ERROR
                        )
                        errors[req.line] = failed
                        writer.write(error_record(failed))
                    else:
                        echoed = _prompt_text(engine.tokenizer, req, ids) if req.echo else ""
                        writer.write(success_record(req, out, model_name, vocab, echoed))
                        answered += 1
                    progress.update(1, out.num_output_tokens, engine.status())
                    report()
            stats = engine.stats
        writer.finish(items, errors)  # also after a stop: the answers so far, tidied
    except KeyboardInterrupt:
        raise JobInterrupted(skipped + answered, len(items)) from None
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
        failures=tuple(errors[line].message for line in sorted(errors)[:LISTED]),
    )


def _prompt_text(tokenizer: Tokenizer, req: BatchRequest, ids: list[int]) -> str:
    """The prompt as ``echo`` returns it: the text as sent, or the token ids decoded."""
    return req.prompt if isinstance(req.prompt, str) else tokenizer.hf.decode(ids)
