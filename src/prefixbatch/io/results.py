"""Write OpenAI batch output records, crash-safely, and find what a previous run answered.

Each record is one complete line written with a single ``write`` and flushed at once, so a killed
job leaves at most one partial last line; ``ResultWriter`` cuts that line off before appending.
Ids are derived from the custom_id, so the same job writes the same file except ``created``.

Resume rule: a request is skipped only when the output holds a *success* record with its
``custom_id`` and its ``request_hash`` (a top-level field of our success records that OpenAI and
vLLM readers ignore: 16 hex digits of the normalised request, see ``batch_file.request_hash``).
Error records never make a request skip. When a run completes, ``ResultWriter.finish`` rewrites
the output atomically to exactly one record per input line, in input order.

At scale neither step holds records as Python objects: an existing output is indexed by one
16-byte key per success record (``record_key`` of its custom_id and hash), and the final
rewrite streams the file, copying each kept record by its offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..chat.reply import assistant_message
from ..outputs import CompletionOutput, RequestOutput
from .batch_file import CHAT_URL, RESPONSES_URL, BatchRequest, LineError
from .logprobs_format import chat_logprobs, completion_logprobs, prompt_logprobs_list
from .response_object import Decode, response_body

HASH_FIELD = "request_hash"
SERVER_ERROR = "server_error"  # the code of a request that failed while it was served


def record_id(prefix: str, custom_id: str) -> str:
    return f"{prefix}{hashlib.sha1(custom_id.encode()).hexdigest()[:24]}"


def success_record(
    req: BatchRequest,
    out: RequestOutput,
    model: str,
    vocab: Sequence[bytes] | None = None,
    prompt_text: str = "",
    decode: Decode | None = None,
) -> dict[str, Any]:
    """The record of an answered request: one choice per ``out.outputs``, with OpenAI's
    ``logprobs`` shapes when asked for (``vocab``: each token id's bytes, needed then), and
    the prompt's ``prompt_logprobs`` as vLLM writes them (chat: in the body; completions: in
    each choice). ``prompt_text`` starts each completion's text when ``req.echo``. A
    ``/v1/responses`` request's body is its Response object (``response_object.py``;
    ``decode``: token ids -> text, special tokens kept, to count its reasoning tokens)."""
    if req.url == RESPONSES_URL:
        return success_envelope(req, response_body(req, out, model, decode))
    usage = {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
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
    return success_envelope(
        req,
        {
            "id": record_id("chatcmpl-" if chat else "cmpl-", req.custom_id),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
            **extra,
        },
    )


def success_envelope(req: BatchRequest, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record_id("batch_req_", req.custom_id),
        "custom_id": req.custom_id,
        "response": {
            "status_code": 200,
            "request_id": record_id("req_", req.custom_id),
            "body": body,
        },
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
        "id": record_id("batch_req_", f"{key}:{err.line}"),
        "custom_id": err.custom_id,
        "response": None,
        "error": {"code": err.code, "message": err.message, "line": err.line},
    }


def record_key(custom_id: str, request_hash: str) -> bytes:
    """16 bytes (BLAKE2b) naming a request's success record: its custom_id and hash."""
    return hashlib.blake2b(f"{request_hash}\n{custom_id}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class Answered:
    """The success records an existing output file holds: the sorted, distinct ``record_key``
    of each ((k,) ``S16``)."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S16"))

    def covers(self, req: BatchRequest) -> bool:
        """Whether ``req`` (same custom_id, same request) was answered successfully."""
        key = np.frombuffer(record_key(req.custom_id, req.request_hash), "S16")
        return bool(self.covered(key)[0])

    def covered(self, keys: np.ndarray) -> np.ndarray:
        """(n,) bool: which of the record keys ``keys`` ((n,) ``S16``) were answered."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys


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


def _records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each complete line (a trailing partial line from a crash is left)."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            yield offset, raw
            offset += len(raw)


def _success_keys(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(keys, offsets, lengths) of the file's success records, in file order, and the byte
    length of its complete lines."""
    keys, offsets, lengths = bytearray(), array("q"), array("q")
    good = 0
    for offset, raw in _records(path):
        good = offset + len(raw)
        hit = _success(raw)
        if hit:
            keys += record_key(*hit)
            offsets.append(offset)
            lengths.append(len(raw))
    return (
        np.frombuffer(bytes(keys), dtype="S16"),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64),
        good,
    )


def read_answered(path: Path) -> tuple[Answered, int]:
    """Index an output file; returns its success records and the byte length of its complete
    lines (a trailing partial line from a crash is not counted). Lines that are not records
    (e.g. of another tool) are kept but answer nothing."""
    if not path.exists():
        return Answered(), 0
    keys, _, _, good = _success_keys(path)
    return Answered(np.unique(keys)), good


class ResultWriter:
    """Appends records to the output file, one flushed line each; ``finish`` rewrites it. The
    file is opened (created, or emptied without ``resume``) at the first write, so a job that
    stops before any record leaves no empty output behind."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path, self.resume = path, resume
        self.answered = Answered()
        if resume:
            self.answered, good = read_answered(path)
            if path.exists() and path.stat().st_size != good:
                with open(path, "r+b") as f:
                    f.truncate(good)  # drop the partial line a crash left
        self._file: TextIO | None = None

    def _open(self) -> TextIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.resume else "w", encoding="utf-8")
        return self._file

    def write(self, record: dict[str, Any]) -> None:
        file = self._open()
        file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()

    def close(self) -> None:
        if self._file is None or self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def finish(self, lines: np.ndarray, keys: np.ndarray, errors: dict[int, LineError]) -> None:
        """Close, then replace the output with one record per input line, in input order: the
        success record of each request (``lines``: (n,) its input line, ascending; ``keys``:
        (n,) ``S16`` its ``record_key``), else the error of its line from ``errors``, which
        also holds the lines that are no request; superseded records and records of custom_ids
        no longer in the input are dropped. A line listed more than once (the inputs of an
        embedding line) gets one record. Atomic: a temporary file in the same folder, fsync,
        rename."""
        first = np.append(True, lines[1:] != lines[:-1]) if len(lines) else np.zeros(0, bool)
        lines, keys = lines[first], keys[first]
        self._open()
        self.close()
        found, offsets, lengths, _ = _success_keys(self.path)
        # The last record of each wanted key (as a resumed run appends a newer one).
        last = np.argsort(found, kind="stable")
        found, offsets, lengths = found[last], offsets[last], lengths[last]
        keep = np.append(found[1:] != found[:-1], True) if len(found) else np.zeros(0, bool)
        found, offsets, lengths = found[keep], offsets[keep], lengths[keep]
        at = np.minimum(np.searchsorted(found, keys), max(len(found) - 1, 0))
        hit = found[at] == keys if len(found) else np.zeros(len(keys), dtype=bool)
        error_lines = sorted(errors)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            e = 0
            for line, ok, k in zip(lines.tolist(), hit.tolist(), at.tolist()):
                while e < len(error_lines) and error_lines[e] < line:
                    dst.write(_error_line(errors[error_lines[e]]))
                    e += 1
                error = e < len(error_lines) and error_lines[e] == line
                e += error
                if ok:
                    src.seek(int(offsets[k]))
                    dst.write(src.read(int(lengths[k])))
                elif error:
                    dst.write(_error_line(errors[line]))
            for line in error_lines[e:]:
                dst.write(_error_line(errors[line]))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


def _error_line(err: LineError) -> bytes:
    return (json.dumps(error_record(err), ensure_ascii=False) + "\n").encode()
