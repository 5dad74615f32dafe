"""The body of a ``/v1/score`` or ``/v1/rerank`` line, as vLLM's score API defines them
(``vllm/entrypoints/pooling/score/protocol.py``; ``/v1/rerank`` is Jina's and Cohere's rerank
API, which vLLM implements).

``/v1/score``: two fields, each a string or a list of strings, under any one of vLLM's names for
them: ``queries`` + ``documents``, ``queries`` + ``items``, ``data_1`` + ``data_2`` or
``text_1`` + ``text_2``. The pairs are 1-to-1, 1-to-N (the one first text with every second
text) or N-to-N (item by item), as vLLM's ``_validate_score_input_lens`` allows.
``/v1/rerank``: ``query`` (a string), ``documents`` (a string or a list of strings), ``top_n``
(the best n results; 0 or absent: all) and ``return_documents`` (Jina's and Cohere's switch,
default true: each result repeats its document). Both take vLLM's ``use_activation`` (false:
the raw logit) and ``model`` and ``user`` (accepted, not used); any other field is an error
naming it (multimodal content parts among them: the engine runs text).
"""

from __future__ import annotations

from typing import Any

from ..pooling import EmbeddingParams
from ..sampling_params import SamplingParams
from ..scoring import ScoreParams
from .json_text import json_text

SCORE_URL = "/v1/score"
RERANK_URL = "/v1/rerank"
SCORE_NAMES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))
SCORE_NAMES += (("text_1", "text_2"),)
COMMON_FIELDS = frozenset({"model", "user", "use_activation"})
RERANK_FIELDS = COMMON_FIELDS | {"query", "documents", "top_n", "return_documents"}

Pair = tuple[str, str]


def _texts(value: Any, name: str) -> list[str]:
    """A score field as a list of texts; raises ValueError naming the field."""
    if value is None:
        raise ValueError(f"missing '{name}' (a string or a list of strings)")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"'{name}' must be a string or a non-empty list of strings")
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"'{name}'[{k}] must be a string, got {json_text(item)}")
    return items


def score_pairs(first: Any, second: Any, names: tuple[str, str]) -> list[Pair]:
    """The (text_1, text_2) pairs of two score fields (their ``names``, for errors): 1-to-1,
    1-to-N or N-to-N. Raises ValueError naming the field: missing, empty, not text, or
    N-to-M lengths."""
    a, b = _texts(first, names[0]), _texts(second, names[1])
    if len(a) == 1:
        a = a * len(b)
    elif len(a) != len(b):
        raise ValueError(
            f"'{names[0]}' has {len(a)} items and '{names[1]}' {len(b)}: the pairs are 1-to-1, "
            f"1-to-N or N-to-N"
        )
    return list(zip(a, b))


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"'{key}' must be true or false, got {json_text(value)}")
    return value


def score_request(body: dict[str, Any], rerank: bool) -> tuple[list[Pair], SamplingParams]:
    """A ``/v1/score`` (``rerank`` False) or ``/v1/rerank`` body -> its pairs and parameters
    (an embedding request's, with ``score``). Raises ValueError naming the field."""
    if rerank:
        names, allowed = ("query", "documents"), RERANK_FIELDS
        query = body.get("query")
        if query is not None and not isinstance(query, str):
            raise ValueError(f"'query' must be a string, got {json_text(query)}")
    else:
        complete = [p for p in SCORE_NAMES if p[0] in body and p[1] in body]
        partial = [p for p in SCORE_NAMES if p[0] in body or p[1] in body]
        if len(complete) > 1 or not partial:
            spelled = ", ".join(f"'{a}' + '{b}'" for a, b in SCORE_NAMES)
            got = " and ".join(f"'{a}' + '{b}'" for a, b in complete) or "none"
            raise ValueError(f"give the pairs as one of {spelled} (got {got})")
        names = (complete or partial)[0]
        allowed = COMMON_FIELDS | set(names)
    pairs = score_pairs(body.get(names[0]), body.get(names[1]), names)
    unknown = sorted(set(body) - allowed)
    if unknown:
        url = RERANK_URL if rerank else SCORE_URL
        raise ValueError(f"unknown field '{unknown[0]}' for {url}")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise ValueError(f"'top_n' must be an integer >= 0, got {json_text(top_n)}")
    score = ScoreParams(
        _flag(body, "use_activation", True),
        names,
        top_n or 0,
        _flag(body, "return_documents", True),
    )
    return pairs, SamplingParams(max_tokens=1, embedding=EmbeddingParams(), score=score)
