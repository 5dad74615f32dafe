"""Read a batch file into a ``BatchStore`` in one streaming pass: parse, resume, tokenize.

Lines are parsed in chunks; a chunk's requests that an earlier run answered are recorded and
not tokenized; the others are rendered and tokenized together (``BatchTokenizer``: each repeated
piece of text once), and their ids go into the store's token arrays. The parsed objects of a
chunk are dropped once it is stored, so memory grows by the store's arrays alone. Every line
that cannot run becomes one ``LineError`` with its line number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..batch_tokenizer import BatchTokenizer
from ..chat.render import ChatOptions, ChatSetup
from ..errors import InputFileError
from ..io.batch_file import BatchRequest, LineError, read_batch_file
from ..io.results import Answered, record_key
from .batch_store import BatchStore
from .validate import tokenize

log = logging.getLogger(__name__)

CHUNK_LINES = 4096
LOG_EVERY = 100_000  # lines between progress messages while reading


@dataclass
class Ingested:
    """A batch file as the job holds it."""

    store: BatchStore  # every request, in input order; token ids of the ones to run
    errors: dict[int, LineError] = field(default_factory=dict)  # by line
    lines: int = 0  # non-blank lines
    skipped: int = 0  # requests answered by an earlier run


def parts(req: BatchRequest) -> list[BatchRequest]:
    """The requests a line runs as: an embedding line one per input, a score line one per pair
    (each its ``part``), any other line itself."""
    n = len(req.inputs)
    if not n:
        return [req]
    return [
        replace(req, inputs=(), part=k, parts=n, pair=p)
        if isinstance(p, tuple)
        else replace(req, inputs=(), part=k, parts=n, prompt=p)
        for k, p in enumerate(req.inputs)
    ]


def ingest(
    path: Path,
    default_max_tokens: int,
    tokenizer: Callable[[], BatchTokenizer],
    answered: Answered | None = None,
    chat: ChatOptions | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> Ingested:
    """Read ``path``; ``tokenizer()`` is called once, when the first request needs tokens;
    chats are rendered under ``chat`` (template and parsers). Raises ``InputFileError`` when
    the file is missing or has no non-blank line."""
    if not path.is_file():
        raise InputFileError(f"input file not found: {path}")
    answered = answered or Answered()
    out = Ingested(BatchStore())
    encoder: tuple[BatchTokenizer, ChatSetup] | None = None
    chunk: list[BatchRequest] = []

    def flush() -> None:
        nonlocal encoder
        keys = [record_key(r.custom_id, r.request_hash) for r in chunk]
        done = answered.covered(np.frombuffer(b"".join(keys), "S16"))
        todo = [r for r, d in zip(chunk, done.tolist()) if not d]
        tokenized: list[tuple[BatchRequest, np.ndarray] | LineError] = []
        if todo:
            if encoder is None:
                fast = tokenizer()
                encoder = fast, ChatSetup(fast.tokenizer, chat)
            tokenized = tokenize(*encoder, todo)
        results = iter(tokenized)
        for req, key, d in zip(chunk, keys, done.tolist()):
            got = None if d else next(results)
            if isinstance(got, LineError):
                out.errors[got.line] = got
                out.store.add(req, key, None)
            elif got is None:
                out.store.add(req, key, None)
            else:  # the request as rendered (its params, its reply format)
                out.store.add(got[0], key, got[1])
        out.skipped += sum(d and r.part == 0 for r, d in zip(chunk, done.tolist()))  # lines
        chunk.clear()

    for item in read_batch_file(path, default_max_tokens):
        out.lines += 1
        if out.lines % LOG_EVERY == 0:
            log.info("read %d lines", out.lines)
        if isinstance(item, LineError):
            out.errors[item.line] = item
            continue
        chunk += parts(item)
        if len(chunk) >= chunk_lines:
            flush()
    if chunk:
        flush()
    if not out.lines:
        raise InputFileError(f"the input file {path} is empty: it has no request lines")
    out.store.freeze()
    return out
