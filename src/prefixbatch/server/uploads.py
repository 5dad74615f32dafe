"""Checking an uploaded batch input file before it is stored.

OpenAI's batch input is JSONL: one JSON object per line (its batch guide). An upload where some
non-blank line is not a JSON object is refused whole (400, naming the first bad line), so no
batch can be created on it; whether each object is a valid request is decided per line when the
batch runs (an error record for that line, the others still run).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.batch_file import LineError, decoded_lines, json_problem, load_line


class BadUpload(ValueError):
    """The upload is not JSONL; the message names the first bad line."""


def check_jsonl(path: Path) -> int:
    """Raise ``BadUpload`` unless every non-blank line of ``path`` is a JSON object; returns
    the number of such lines, which must be at least one. The file is decoded as ``prefixbatch
    run`` decodes it (UTF-8 with or without a byte-order mark, or UTF-16 with one; CRLF line
    ends and blank lines are fine), so the server takes every file the CLI takes."""
    count = 0
    for number, text in decoded_lines(path):
        if isinstance(text, LineError):
            raise BadUpload(text.message)
        if not text.strip():
            continue
        try:
            obj = load_line(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BadUpload(f"line {number}: {json_problem(e)}") from None
        if not isinstance(obj, dict):
            raise BadUpload(f"line {number}: expected a JSON object, got {type(obj).__name__}")
        count += 1
    if not count:
        raise BadUpload("the file holds no JSON lines")
    return count
