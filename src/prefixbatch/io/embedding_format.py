"""The answer of an ``/v1/embeddings`` line in OpenAI's embedding response shape
(https://platform.openai.com/docs/api-reference/embeddings/object): ``{"object": "list",
"data": [{"object": "embedding", "embedding": ..., "index": i}], "model", "usage":
{"prompt_tokens", "total_tokens"}}``, one entry per input in input order. ``embedding`` is a
list of floats, or with ``encoding_format: "base64"`` the base64 of its little-endian float32
bytes (as OpenAI's clients decode it: ``np.frombuffer(base64.b64decode(s), "<f4")``).

A line's inputs run as separate requests; ``EmbeddingLines`` gathers them until the line is
complete.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..outputs import RequestOutput
from .batch_file import BatchRequest
from .results import success_envelope


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector (d,) as ``embedding`` holds it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def embedding_record(
    req: BatchRequest, vectors: list[np.ndarray], prompt_tokens: int, model: str
) -> dict[str, Any]:
    """The success record of an embedding line: ``vectors`` by input, in order."""
    assert req.params.embedding is not None
    fmt = req.params.embedding.encoding_format
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": encode_embedding(v, fmt), "index": i}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return success_envelope(req, body)


@dataclass
class _Line:
    vectors: list[np.ndarray | None]
    prompt_tokens: int = 0


@dataclass
class EmbeddingLines:
    """The embedding lines some of whose inputs are answered, by line."""

    _open: dict[int, _Line] = field(default_factory=dict)

    def add(self, req: BatchRequest, out: RequestOutput, model: str) -> dict[str, Any] | None:
        """Take input ``req.part``'s answer; the line's record once every input has one."""
        line = self._open.setdefault(req.line, _Line([None] * req.parts))
        line.vectors[req.part] = out.embedding
        line.prompt_tokens += out.num_prompt_tokens
        if any(v is None for v in line.vectors):
            return None
        del self._open[req.line]
        vectors = [v for v in line.vectors if v is not None]
        return embedding_record(req, vectors, line.prompt_tokens, model)

    def drop(self, line: int) -> None:
        """Forget a line that failed."""
        self._open.pop(line, None)
