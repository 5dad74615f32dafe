"""The answer of an ``/v1/embeddings`` line in OpenAI's embedding response shape
(https://platform.openai.com/docs/api-reference/embeddings/object): ``{"object": "list",
"data": [{"object": "embedding", "embedding": ..., "index": i}], "model", "usage":
{"prompt_tokens", "total_tokens"}}``, one entry per input in input order. ``embedding`` is a
list of floats, or with ``encoding_format: "base64"`` the base64 of its little-endian float32
bytes (as OpenAI's clients decode it: ``np.frombuffer(base64.b64decode(s), "<f4")``).

A line's inputs run as separate requests; ``line_parts.LineParts`` gathers them until the line
is complete.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .batch_file import BatchRequest
from .line_parts import Part
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


def embedding_line(parts: list[Part], model: str) -> dict[str, Any]:
    """The record of an embedding line from its answered inputs, in order."""
    vectors = [out.embedding for _, out in parts if out.embedding is not None]
    prompt_tokens = sum(out.num_prompt_tokens for _, out in parts)
    return embedding_record(parts[0][0], vectors, prompt_tokens, model)
