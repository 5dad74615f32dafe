"""Write OpenAI batch output records, crash-safely, and find what a previous run answered.

Each record is one complete line written with a single ``write`` and flushed at once, so a killed
job leaves at most one partial last line; ``ResultWriter`` cuts that line off before appending.
Ids are derived from the custom_id, so the same job writes the same file except ``created``.

Resume rule: a request is skipped only when the output holds a *success* record with its
``custom_id`` and its ``request_hash`` (a top-level field of our success records that OpenAI and
vLLM readers ignore: 16 hex digits of the normalised request, see ``batch_file.request_hash``).
Error records never make a request skip. When a run completes, ``ResultWriter.finish`` rewrites
the output atomically to exactly one record per input line, in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat.reply import assistant_message
from ..outputs import CompletionOutput, RequestOutput
from .batch_file import CHAT_URL, BatchRequest, LineError
from .logprobs_format import chat_logprobs, completion_logprobs, prompt_logprobs_list

HASH_FIELD = "request_hash"
SERVER_ERROR = "server_error"  # the code of a request that failed while it was served


def _id(prefix: str, custom_id: str) -> str:
    return f"{prefix}{hashlib.sha1(custom_id.encode()).hexdigest()[:24]}"


def success_record(
    req: BatchRequest,
    out: RequestOutput,
    model: str,
    vocab: Sequence[bytes] | None = None,
    prompt_text: str = "",
) -> dict[str, Any]:
    """The record of an answered request: one choice per ``out.outputs``, with OpenAI's
    ``logprobs`` shapes when asked for (``vocab``: each token id's bytes, needed then), and
    the prompt's ``prompt_logprobs`` as vLLM writes them (chat: in the body; completions: in
    each choice). ``prompt_text`` starts each completion's text when ``req.echo``."""
    usage = {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
    }
    chat = req.url == CHAT_URL
    choices = [_choice(req, out, c, vocab, prompt_text) for c in out.outputs]
    extra: dict[str, Any] = {}
    if out.prompt_logprobs is not None and vocab is not None:
        scored = prompt_logprobs_list(out.prompt_logprobs, vocab)
        if chat:
            extra["prompt_logprobs"] = scored
        else:
            for choice in choices:
                choice["prompt_logprobs"] = scored
    body = {
        "id": _id("chatcmpl-" if chat else "cmpl-", req.custom_id),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        **extra,
    }
    return {
        "id": _id("batch_req_", req.custom_id),
        "custom_id": req.custom_id,
        "response": {"status_code": 200, "request_id": _id("req_", req.custom_id), "body": body},
        "error": None,
        HASH_FIELD: req.request_hash,
    }


def _choice(
    req: BatchRequest,
    out: RequestOutput,
    c: CompletionOutput,
    vocab: Sequence[bytes] | None,
    prompt_text: str,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
    if req.url == CHAT_URL:
        key = f"{req.custom_id}:{c.index}"
        message, choice["finish_reason"] = assistant_message(
            c.text, c.finish_reason, req.reply, key
        )
        choice["message"] = message.to_openai()
        if c.logprobs is not None and vocab is not None:
            choice["logprobs"] = chat_logprobs(c.logprobs, vocab)
        return choice
    choice["text"] = prompt_text + c.text if req.echo else c.text
    if c.logprobs is not None and vocab is not None:
        if req.echo and out.prompt_logprobs is not None:
            entries = [*out.prompt_logprobs, *c.logprobs]
            choice["logprobs"] = completion_logprobs(entries, vocab, out.prompt_token_ids[:1])
        else:
            choice["logprobs"] = completion_logprobs(c.logprobs, vocab)
    return choice


def error_record(err: LineError) -> dict[str, Any]:
    """The error record of a line; ``custom_id`` is the line's own value, even if not a string."""
    key = err.custom_id if isinstance(err.custom_id, str) else f"line-{err.line}"
    return {
        "id": _id("batch_req_", f"{key}:{err.line}"),
        "custom_id": err.custom_id,
        "response": None,
        "error": {"code": err.code, "message": err.message, "line": err.line},
    }


@dataclass
class Answered:
    """The success records an existing output file holds: custom_id -> request hash."""

    hashes: dict[str, str] = field(default_factory=dict)

    def covers(self, req: BatchRequest) -> bool:
        """Whether ``req`` (same custom_id, same request) was answered successfully."""
        return self.hashes.get(req.custom_id) == req.request_hash


def _success(raw: bytes) -> tuple[str, str] | None:
    """(custom_id, request hash) of a success record line, else None."""
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("error") is not None:
        return None
    cid, digest = rec.get("custom_id"), rec.get(HASH_FIELD)
    if isinstance(cid, str) and isinstance(digest, str) and isinstance(rec.get("response"), dict):
        return cid, digest
    return None


def read_answered(path: Path) -> tuple[Answered, int]:
    """Parse an output file; returns its success records and the byte length of its complete
    lines (a trailing partial line from a crash is not counted). Lines that are not records
    (e.g. of another tool) are kept but answer nothing."""
    answered = Answered()
    good = 0
    if not path.exists():
        return answered, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            good += len(raw)
            hit = _success(raw)
            if hit:
                answered.hashes[hit[0]] = hit[1]
    return answered, good


class ResultWriter:
    """Appends records to the output file, one flushed line each; ``finish`` rewrites it."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.answered = Answered()
        if resume:
            self.answered, good = read_answered(path)
            if path.exists() and path.stat().st_size != good:
                with open(path, "r+b") as f:
                    f.truncate(good)  # drop the partial line a crash left
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if resume else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def finish(self, items: list[BatchRequest | LineError], errors: dict[int, LineError]) -> None:
        """Close, then replace the output with one record per input line, in input order: the
        success record of each request (``covers`` it: same custom_id and hash), else its
        error from ``errors`` (by line); superseded records and records of custom_ids no longer
        in the input are dropped. Atomic: a temporary file in the same folder, fsync, rename."""
        self.close()
        wanted = {i.custom_id: i.request_hash for i in items if isinstance(i, BatchRequest)}
        where: dict[str, tuple[int, int]] = {}  # custom_id -> (offset, length) of its record
        offset = 0
        with open(self.path, "rb") as f:
            for raw in f:
                hit = _success(raw)
                if hit and wanted.get(hit[0]) == hit[1]:
                    where[hit[0]] = (offset, len(raw))
                offset += len(raw)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for item in items:
                if isinstance(item, BatchRequest) and item.custom_id in where:
                    start, length = where[item.custom_id]
                    src.seek(start)
                    dst.write(src.read(length))
                elif item.line in errors:
                    record = error_record(errors[item.line])
                    dst.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)
