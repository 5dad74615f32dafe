"""Checking an uploaded batch input file before it is stored.

OpenAI's batch input is JSONL: one JSON object per line (its batch guide). An upload where some
non-blank line is not a JSON object is refused whole (400, naming the first bad line), so no
batch can be created on it; whether each object is a valid request is decided per line when the
batch runs (an error record for that line, the others still run).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.batch_file import json_problem


class BadUpload(ValueError):
    """The upload is not JSONL; the message names the first bad line."""


def check_jsonl(path: Path) -> int:
    """Raise ``BadUpload`` unless every non-blank line of ``path`` is a JSON object (UTF-8);
    returns the number of such lines, which must be at least one."""
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadUpload(f"line {number}: not valid UTF-8 ({e.reason})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise BadUpload(f"line {number}: {json_problem(e)}") from None
            if not isinstance(obj, dict):
                raise BadUpload(
                    f"line {number}: expected a JSON object, got {type(obj).__name__}"
                ) from None
            count += 1
    if not count:
        raise BadUpload("the file holds no JSON lines")
    return count
