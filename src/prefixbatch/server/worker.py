"""The batch worker: one thread that runs batches one at a time, oldest first, on the one
executor loaded at start-up.

A batch's answers go to its combined record file (successes and errors, crash-safe, resumable:
``jobs.job.run_batch``); at the end that file is split into the output file (successes) and the
error file (errors), as OpenAI splits them. After a crash, whatever was unfinished is picked up
again in order, and a batch that was running resumes from its record file.

Lifecycle (OpenAI's statuses): validating (queued; checked at dequeue) -> in_progress ->
finalizing -> completed (with the token ``usage`` of the answered requests, their
``cached_tokens`` included); failed (the input cannot run at
all); expired (still queued when its completion window passed); cancelling (asked to stop; the
run stops after the next output) -> cancelled, keeping what finished.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..chat.render import ChatOptions
from ..errors import JobError
from ..io.batch_file import BatchRequest, read_batch_file
from ..jobs.job import JobOptions, run_batch
from .objects import FILE_PREFIX, BatchRecord, FileRecord, new_id
from .storage import Store

if TYPE_CHECKING:
    from ..distributed.ray_executor import RayExecutor
    from ..engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    default_max_tokens: int = 256  # for requests that set no max_tokens
    progress_interval_s: float = 0.25  # request_counts are written at most this often
    chat: ChatOptions = ChatOptions()  # chat template and tool-call / reasoning parsers


def _now() -> int:
    return int(time.time())


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    """An entry of the Batch object's ``errors.data``."""
    return {"code": code, "message": message, "param": None, "line": line}


class BatchWorker:
    """Runs the store's unfinished batches on ``engine``; ``notify()`` after creating or
    cancelling one, ``stop()`` at shutdown (a running batch stays in_progress and resumes on
    the next start)."""

    def __init__(
        self, store: Store, engine: LLMEngine | RayExecutor, opts: WorkerOptions | None = None
    ) -> None:
        self.store, self.engine = store, engine
        self.opts = opts or WorkerOptions()
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._shutdown.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._shutdown.is_set():
            self._wake.clear()
            batch = self.store.next_active_batch()
            if batch is None:
                self._wake.wait()
                continue
            try:
                self._process(batch)
            except Exception as e:  # keep serving; the batch says what went wrong
                log.exception("batch %s failed", batch.id)
                self._fail(batch.id, _error("server_error", f"{type(e).__name__}: {e}"))

    def _process(self, batch: BatchRecord) -> None:
        if batch.status == "validating" and _now() > batch.expires_at:
            self.store.update_batch(batch.id, lambda b: {"status": "expired", "expired_at": _now()})
            return
        lines = self._validate(batch)
        if lines is None:
            return
        if batch.status == "validating":
            batch = self.store.update_batch(
                batch.id,
                lambda b: (
                    {"status": "in_progress", "in_progress_at": _now(), "total": lines}
                    if b.status == "validating"
                    else None
                ),
            )
        if batch.status == "in_progress":
            self._run(batch)
            if self._shutdown.is_set():
                return
            batch = self.store.update_batch(
                batch.id,
                lambda b: (
                    {"status": "finalizing", "finalizing_at": _now()}
                    if b.status == "in_progress"
                    else None
                ),
            )
        self._finalize(batch, lines)

    def _input(self, batch: BatchRecord) -> Path | None:
        record = self.store.get(FileRecord, batch.input_file_id)
        return None if record is None else self.store.blob_path(record.stored_name)

    def _validate(self, batch: BatchRecord) -> int | None:
        """The input's line count, or None after failing the batch: an input that cannot be
        read, holds no request, or has requests for another endpoint than the batch's. One
        streaming pass: nothing of the file is kept."""
        path = self._input(batch)
        if path is None or not path.is_file():
            self._fail(batch.id, _error("missing_file", "the input file was deleted"))
            return None
        lines, wrong = 0, []
        for item in read_batch_file(path, self.opts.default_max_tokens):
            lines += 1
            if isinstance(item, BatchRequest) and item.url != batch.endpoint:
                message = (
                    f"line {item.line}: a {item.url} request does not belong in a "
                    f"{batch.endpoint} batch (a batch has one endpoint, as in OpenAI's Batch API)"
                )
                wrong.append(_error("invalid_url", message, item.line))
        if not lines:
            self._fail(batch.id, _error("empty_file", "the input file holds no request"))
            return None
        if wrong:
            self._fail(batch.id, *wrong)
            return None
        return lines

    def _run(self, batch: BatchRecord) -> None:
        last = 0.0

        def should_stop() -> bool:
            if self._shutdown.is_set():
                return True
            current = self.store.get(BatchRecord, batch.id)
            return current is None or current.status == "cancelling"

        def on_progress(completed: int, failed: int, total: int) -> None:
            nonlocal last
            if time.monotonic() - last >= self.opts.progress_interval_s:
                last = time.monotonic()
                self.store.update_batch(
                    batch.id, lambda b: {"completed": completed, "failed": failed, "total": total}
                )

        path = self._input(batch)
        if path is None:
            self._fail(batch.id, _error("missing_file", "the input file was deleted"))
            return
        opts = JobOptions(
            input=path,
            output=self.store.blob_path(batch.records_name),
            default_max_tokens=self.opts.default_max_tokens,
            quiet=True,
            chat=self.opts.chat,
        )
        try:
            run_batch(lambda: self.engine, opts, should_stop, on_progress)
        except JobError as e:
            self._fail(batch.id, _error("batch_failed", str(e)))

    def _finalize(self, batch: BatchRecord, lines: int) -> None:
        """Split the record file (in input order: the job's last rewrite) into the output and
        error files, streaming, and close the batch: completed (or cancelled when it was
        cancelling)."""
        if batch.status not in ("finalizing", "cancelling"):
            return  # failed while running
        outputs = {kind: self.store.new_blob() for kind in ("output", "error")}
        counts = {"output": 0, "error": 0}
        sizes = {"output": 0, "error": 0}
        prompt_tokens = completion_tokens = cached_tokens = 0
        records = self.store.blob_path(batch.records_name)
        with open(outputs["output"][1], "wb") as ok, open(outputs["error"][1], "wb") as bad:
            for raw in _complete_lines(records):
                rec = json.loads(raw)
                if rec.get("error") is None:
                    kind = "output"
                    usage = rec["response"]["body"]["usage"]
                    # /v1/responses names them input_tokens and output_tokens
                    prompt_tokens += usage.get("prompt_tokens", usage.get("input_tokens", 0))
                    completion_tokens += usage.get(
                        "completion_tokens", usage.get("output_tokens", 0)
                    )
                    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
                    cached_tokens += (details or {}).get("cached_tokens", 0)
                else:
                    kind = "error"
                    if not isinstance(rec.get("custom_id"), str):  # OpenAI's is a string
                        line = rec["error"].get("line") or 0
                        rec["custom_id"] = _string_id(rec.get("custom_id"), line)
                        raw = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
                (ok if kind == "output" else bad).write(raw)
                counts[kind] += 1
                sizes[kind] += len(raw)
        files = {}
        for kind, (name, path) in outputs.items():
            if counts[kind]:
                filename = f"{batch.id}_{kind}.jsonl"
                record = FileRecord(
                    new_id(FILE_PREFIX), sizes[kind], _now(), filename, "batch_output", name
                )
                files[kind] = record
            else:
                path.unlink()
        done = "cancelled" if batch.status == "cancelling" else "completed"
        log.info(
            "batch %s %s: %d of %d lines answered, %d failed",
            batch.id, done, counts["output"], lines, counts["error"],
        )  # fmt: skip
        self.store.update_batch(
            batch.id,
            lambda b: {
                "status": done,
                f"{done}_at": _now(),
                "completed": counts["output"],
                "failed": counts["error"],
                "total": lines,
                "output_file_id": files["output"].id if "output" in files else None,
                "error_file_id": files["error"].id if "error" in files else None,
                "usage": {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {"cached_tokens": cached_tokens},
                    "output_tokens": completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            new_files=tuple(files.values()),
        )

    def _fail(self, batch_id: str, *errors: dict[str, Any]) -> None:
        self.store.update_batch(
            batch_id, lambda b: {"status": "failed", "failed_at": _now(), "errors": list(errors)}
        )


def _string_id(custom_id: Any, line: int) -> str:
    """An error line's ``custom_id`` as a string: the JSON text of a value that is not one
    (``5`` -> ``"5"``), ``line-N`` when the line had none."""
    return f"line-{line}" if custom_id is None else json.dumps(custom_id, ensure_ascii=False)


def _complete_lines(path: Path) -> Iterator[bytes]:
    """The record file's complete lines (a run that stopped has closed it; none if absent)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw
