"""Requests that are parts of one batch line, gathered until the line is complete.

An ``/v1/embeddings`` line's inputs and a ``/v1/score`` or ``/v1/rerank`` line's pairs run as
requests of their own (``BatchRequest.part`` of ``parts``); the line's one record is written
once every part is answered, from all of them (``embedding_format.embedding_line``,
``score_format.score_line``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..outputs import RequestOutput
from .batch_file import BatchRequest

Part = tuple[BatchRequest, RequestOutput]


@dataclass
class LineParts:
    """The lines some of whose parts are answered, by line."""

    _open: dict[int, list[Part | None]] = field(default_factory=dict)

    def add(self, req: BatchRequest, out: RequestOutput) -> list[Part] | None:
        """Take part ``req.part``'s answer; every part of the line, in order, once all have
        one (None before)."""
        parts = self._open.setdefault(req.line, [None] * req.parts)
        parts[req.part] = (req, out)
        if any(p is None for p in parts):
            return None
        del self._open[req.line]
        return [p for p in parts if p is not None]

    def drop(self, line: int) -> None:
        """Forget a line that failed."""
        self._open.pop(line, None)
