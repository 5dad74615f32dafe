"""The answers of ``/v1/score`` and ``/v1/rerank`` lines, in vLLM's response shapes
(``vllm/entrypoints/pooling/score/protocol.py``):

- score: ``{"id", "object": "list", "created", "model", "data": [{"index": i, "object":
  "score", "score": s}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}``,
  one entry per pair in pair order;
- rerank (vLLM's, Jina's): ``{"id", "model", "usage": {"prompt_tokens", "total_tokens"},
  "results": [{"index": i, "document": {"text": ...}, "relevance_score": s}]}``, sorted by
  ``relevance_score``, highest first, cut to ``top_n`` when it is set (and below the number of
  documents); ``document`` is left out with ``return_documents: false``.

A line's pairs run as separate requests; ``line_parts.LineParts`` gathers them until the line
is complete.
"""

from __future__ import annotations

import time
from typing import Any

from .line_parts import Part
from .results import record_id, success_envelope
from .score_request import RERANK_URL


def score_body(scores: list[float], prompt_tokens: int, model: str, ident: str) -> dict[str, Any]:
    """A ``/v1/score`` response: ``scores`` by pair, in order."""
    return {
        "id": ident,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                  "completion_tokens": 0},
    }  # fmt: skip


def rerank_body(
    scores: list[float],
    documents: list[str] | None,
    top_n: int,
    prompt_tokens: int,
    model: str,
    ident: str,
) -> dict[str, Any]:
    """A ``/v1/rerank`` response: the documents' ``scores`` (and texts, or None to leave them
    out) by document, sorted best first, the best ``top_n`` (0: all)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if 0 < top_n < len(order):
        order = order[:top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i}
        if documents is not None:
            result["document"] = {"text": documents[i]}
        result["relevance_score"] = scores[i]
        results.append(result)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"id": ident, "model": model, "usage": usage, "results": results}


def score_line(parts: list[Part], model: str) -> dict[str, Any]:
    """The record of a score or rerank line from its answered pairs, in order (a rerank
    pair's ``prompt`` is its document when the record returns it)."""
    req = parts[0][0]
    scores = [out.score for _, out in parts if out.score is not None]
    prompt_tokens = sum(out.num_prompt_tokens for _, out in parts)
    params = req.params.score
    assert params is not None
    if req.url == RERANK_URL:
        documents = None
        if params.return_documents:
            documents = [r.prompt if isinstance(r.prompt, str) else "" for r, _ in parts]
        ident = record_id("rerank-", req.custom_id)
        body = rerank_body(scores, documents, params.top_n, prompt_tokens, model, ident)
    else:
        body = score_body(scores, prompt_tokens, model, record_id("score-", req.custom_id))
    return success_envelope(req, body)
