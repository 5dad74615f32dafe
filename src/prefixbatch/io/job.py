"""A batch job: batch file in, answers out, every request answered exactly once.

Whole-job problems raise ``JobError`` before any compute; problems of single lines become error
records while every other request runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import EngineConfig
from ..engine import LLMEngine
from ..outputs import Request
from ..tokenizer import Tokenizer
from .batch_file import CHAT_URL, BatchRequest, LineError, read_batch_file
from .progress import Progress
from .results import ResultWriter, error_record, success_record

if TYPE_CHECKING:
    from ..distributed.ray_executor import RayExecutor


class JobError(RuntimeError):
    """A problem with the whole job (input, model, memory): reported in one line, exit 2."""


@dataclass(frozen=True)
class JobOptions:
    input: Path
    output: Path
    overwrite: bool = False  # start over instead of resuming an existing output file
    default_max_tokens: int = 256
    quiet: bool = False
    workers: int = 1  # > 1, or a ray_address: engine actors on Ray
    ray_address: str | None = None


@dataclass(frozen=True)
class JobSummary:
    requests_ok: int
    requests_failed: int
    skipped: int  # answered by an earlier run
    prompt_tokens: int
    output_tokens: int
    prefill_tokens_saved: int
    preemptions: int
    wall_s: float

    def lines(self) -> list[str]:
        tps = self.output_tokens / self.wall_s if self.wall_s else 0.0
        return [
            f"requests: {self.requests_ok} ok, {self.requests_failed} failed, "
            f"{self.skipped} already answered",
            f"tokens: {self.prompt_tokens} prompt, {self.output_tokens} output, "
            f"{self.prefill_tokens_saved} prefill tokens saved by sharing",
            f"preemptions: {self.preemptions}",
            f"wall time: {self.wall_s:.1f}s, {tps:.1f} output tok/s",
        ]


def read_items(path: Path, default_max_tokens: int) -> list[BatchRequest | LineError]:
    if not path.is_file():
        raise JobError(f"input file not found: {path}")
    return list(read_batch_file(path, default_max_tokens))


def tokenize(
    tokenizer: Tokenizer, items: list[BatchRequest]
) -> tuple[list[tuple[BatchRequest, list[int]]], list[LineError]]:
    """Token ids per request (chat template for chats); template failures and empty prompts are
    line errors. Texts are encoded in one batched call."""
    ok: list[tuple[BatchRequest, list[int]]] = []
    errors: list[LineError] = []
    texts: list[tuple[BatchRequest, str, bool]] = []
    for req in items:
        if isinstance(req.prompt, list):
            ok.append((req, list(req.prompt)))
            continue
        if req.url == CHAT_URL:
            try:
                texts.append((req, tokenizer.render_chat(req.messages or []), False))
            except Exception as e:  # a template may raise anything (jinja, our checks)
                errors.append(
                    LineError(
                        req.line, req.custom_id, f"line {req.line}: chat template failed: {e}"
                    )
                )
        else:
            texts.append((req, req.prompt or "", True))
    for special in (False, True):
        batch = [(r, t) for r, t, s in texts if s is special]
        if batch:
            ids = tokenizer.encode_batch([t for _, t in batch], add_special_tokens=special)
            ok += [(r, i) for (r, _), i in zip(batch, ids)]
    kept = []
    for req, ids in ok:
        if not ids:
            errors.append(
                LineError(req.line, req.custom_id, f"line {req.line}: the prompt is empty")
            )
        else:
            kept.append((req, ids))
    return kept, errors


def make_executor(
    config: EngineConfig, workers: int = 1, ray_address: str | None = None
) -> LLMEngine | RayExecutor:
    """One in-process engine, or engine actors on Ray for ``--workers`` / ``--ray-address``."""
    try:
        if workers > 1 or ray_address:
            from ..distributed.ray_executor import RayExecutor

            return RayExecutor(config, max(1, workers), ray_address)
        return LLMEngine(config)
    except (OSError, ValueError) as e:
        raise JobError(str(e)) from e


def run_job(config: EngineConfig, opts: JobOptions) -> JobSummary:
    """Read the batch file, load the executor, run every request not yet answered."""
    start = time.monotonic()
    items = read_items(opts.input, opts.default_max_tokens)
    engine = make_executor(config, opts.workers, opts.ray_address)
    return run_batch(engine, items, opts, start=start)


def run_batch(
    engine: LLMEngine | RayExecutor,
    items: list[BatchRequest | LineError],
    opts: JobOptions,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
    start: float | None = None,
) -> JobSummary:
    """Answer the batch file's ``items`` on ``engine`` into ``opts.output``, resuming it.

    ``should_stop()`` is checked after each output: when it returns True the output file is
    flushed and the function returns, leaving the rest unanswered (a later call resumes).
    ``on_progress(completed, failed, total)`` is called with counts over all ``items``
    (answers from an earlier run included) after the error records are written and after each
    output.
    """
    start = time.monotonic() if start is None else start
    writer = ResultWriter(opts.output, resume=not opts.overwrite)
    answered = writer.answered
    todo = [i for i in items if not answered.covers(i)]
    skipped = len(items) - len(todo)
    done_before = sum(  # earlier successes; the other skipped items are earlier errors
        isinstance(i, BatchRequest) and i.custom_id in answered.custom_ids for i in items
    )
    errors = [i for i in todo if isinstance(i, LineError)]
    tokenized, token_errors = tokenize(
        engine.tokenizer, [i for i in todo if isinstance(i, BatchRequest)]
    )
    errors += token_errors
    runnable: list[tuple[BatchRequest, list[int]]] = []
    too_big = 0
    for req, ids in tokenized:
        problem = engine.check_request(len(ids), req.params.max_tokens)
        if problem:
            too_big += not engine.limits.fits_kv(len(ids), req.params.max_tokens)
            errors.append(LineError(req.line, req.custom_id, f"line {req.line}: {problem}"))
        else:
            runnable.append((req, ids))
    if too_big and not runnable:
        writer.close()
        raise JobError(
            f"the KV cache ({engine.limits.num_blocks} blocks) is too small for even one "
            "request; raise --kv-cache-memory"
        )
    for err in sorted(errors, key=lambda e: e.line):
        writer.write(error_record(err))
    failed = skipped - done_before + len(errors)
    if on_progress:
        on_progress(done_before, failed, len(items))
    model_name = engine.model_name
    progress = Progress(len(runnable), quiet=opts.quiet)
    requests = [Request(i, ids, req.params) for i, (req, ids) in enumerate(runnable)]
    try:
        for out in engine.generate(requests):
            writer.write(success_record(runnable[out.index][0], out, model_name))
            progress.update(1, len(out.output_token_ids), engine.status())
            if on_progress:
                on_progress(done_before + progress.done, failed, len(items))
            if should_stop and should_stop():
                break
    except ValueError as e:  # every Ray worker died
        raise JobError(str(e)) from e
    finally:
        progress.close()
        writer.close()
    stats = engine.stats
    return JobSummary(
        requests_ok=progress.done,
        requests_failed=len(errors),
        skipped=skipped,
        prompt_tokens=stats.prompt_tokens,
        output_tokens=stats.output_tokens,
        prefill_tokens_saved=stats.prompt_tokens - stats.prefill_tokens_computed,
        preemptions=stats.preemptions,
        wall_s=time.monotonic() - start,
    )
