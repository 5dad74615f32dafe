"""The body of an ``/v1/embeddings`` line, as OpenAI's embeddings API defines it
(https://platform.openai.com/docs/api-reference/embeddings/create): ``input`` (a string, a list
of strings, a list of token ids, or a list of token-id lists; one embedding per item),
``encoding_format`` (``float`` or ``base64``), ``dimensions``, ``model`` and ``user`` (accepted,
not used). Any other field is an error naming it.
"""

from __future__ import annotations

from typing import Any

from ..pooling import ENCODING_FORMATS, EmbeddingParams
from ..sampling_params import SamplingParams
from .json_text import json_text

EMBEDDINGS_URL = "/v1/embeddings"
EMBEDDING_FIELDS = frozenset({"input", "encoding_format", "dimensions", "model", "user"})

Input = str | list[int]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def embedding_inputs(value: Any) -> tuple[Input, ...]:
    """``input`` as a tuple of prompts (texts or token-id lists). Raises ValueError naming
    the field: missing, an empty list, an empty item, or an item of another type."""
    if value is None:
        raise ValueError("missing 'input' (a string, a list of strings or of token ids)")
    if isinstance(value, str):
        value = [value]
    elif _token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("'input' must be a non-empty string or list (of strings or token ids)")
    for k, item in enumerate(value):
        if item == "" or item == []:
            raise ValueError(f"'input'[{k}] is empty")
        if not isinstance(item, str) and not _token_ids(item):
            raise ValueError(
                f"'input'[{k}] must be a string or a list of token ids, got {json_text(item)}"
            )
    return tuple(value)


def embedding_params(body: dict[str, Any]) -> SamplingParams:
    """The request's parameters (``max_tokens`` 1: nothing is sampled). Raises ValueError
    naming the field for an unknown field or a bad ``encoding_format`` or ``dimensions``."""
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise ValueError(f"unknown field '{unknown[0]}' for {EMBEDDINGS_URL}")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise ValueError(f"'encoding_format' must be 'float' or 'base64', got {json_text(fmt)}")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise ValueError(f"'dimensions' must be a positive integer, got {json_text(dimensions)}")
    return SamplingParams(max_tokens=1, embedding=EmbeddingParams(dimensions, fmt))
