"""Write OpenAI batch output records, crash-safely, and find what a previous run answered.

Each record is one complete line written with a single ``write`` and flushed at once, so a killed
job leaves at most one partial last line; ``ResultWriter`` cuts that line off before appending.
Ids are derived from the custom_id, so the same job writes the same file except ``created``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..outputs import RequestOutput
from .batch_file import CHAT_URL, BatchRequest, LineError


def _id(prefix: str, custom_id: str) -> str:
    return f"{prefix}{hashlib.sha1(custom_id.encode()).hexdigest()[:24]}"


def success_record(req: BatchRequest, out: RequestOutput, model: str) -> dict[str, Any]:
    usage = {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": len(out.output_token_ids),
        "total_tokens": out.num_prompt_tokens + len(out.output_token_ids),
    }
    chat = req.url == CHAT_URL
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": out.text}
    else:
        choice["text"] = out.text
    body = {
        "id": _id("chatcmpl-" if chat else "cmpl-", req.custom_id),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
    return {
        "id": _id("batch_req_", req.custom_id),
        "custom_id": req.custom_id,
        "response": {"status_code": 200, "request_id": _id("req_", req.custom_id), "body": body},
        "error": None,
    }


def error_record(err: LineError) -> dict[str, Any]:
    key = err.custom_id or f"line-{err.line}"
    return {
        "id": _id("batch_req_", f"{key}:{err.line}"),
        "custom_id": err.custom_id,
        "response": None,
        "error": {"code": err.code, "message": err.message, "line": err.line},
    }


@dataclass
class Answered:
    """What an existing output file already holds."""

    custom_ids: set[str] = field(default_factory=set)  # answered successfully
    error_lines: set[int] = field(default_factory=set)  # input lines answered with an error

    def covers(self, item: BatchRequest | LineError) -> bool:
        if isinstance(item, BatchRequest) and item.custom_id in self.custom_ids:
            return True
        return item.line in self.error_lines


def read_answered(path: Path) -> tuple[Answered, int]:
    """Parse an output file; returns what it answers and the byte length of its complete lines
    (a trailing partial or corrupt line from a crash is not counted)."""
    answered = Answered()
    good = 0
    if not path.exists():
        return answered, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(rec, dict):
                break
            err = rec.get("error")
            if isinstance(err, dict) and isinstance(err.get("line"), int):
                answered.error_lines.add(err["line"])
            elif isinstance(rec.get("custom_id"), str):
                answered.custom_ids.add(rec["custom_id"])
            good += len(raw)
    return answered, good


class ResultWriter:
    """Appends records to the output file, one flushed line each."""

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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
