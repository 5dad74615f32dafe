"""OpenAI's response shapes for log-probabilities.

Chat completions (https://platform.openai.com/docs/api-reference/chat/object, ``choices[i].
logprobs``)::

    {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                  "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}, ...]}],
     "refusal": null}

Completions (https://platform.openai.com/docs/api-reference/completions/object, the legacy
format vLLM also writes)::

    {"tokens": ["Hi", ...], "token_logprobs": [-0.1, ...],
     "top_logprobs": [{"Hi": -0.1, "Hello": -2.3}, ...], "text_offset": [0, 2, ...]}

A token's text is its bytes decoded as UTF-8 with replacement characters (a token that holds
part of a multi-byte character shows U+FFFD; ``bytes`` keeps the exact bytes, which is why OpenAI
added the field). ``text_offset`` is the running character count of the token texts, as vLLM
computes it. In completions ``top_logprobs`` also holds the chosen token when it is not among
the top ones ("up to logprobs + 1 elements", OpenAI), and with ``echo`` the first prompt token
has ``null`` for both its log-probability and its alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..outputs import TokenLogprob


def _text(token_bytes: bytes) -> str:
    return token_bytes.decode("utf-8", errors="replace")


def _chat_token(token_id: int, logprob: float, vocab: Sequence[bytes]) -> dict[str, Any]:
    raw = vocab[token_id]
    return {"token": _text(raw), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: Sequence[TokenLogprob], vocab: Sequence[bytes]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion; ``vocab`` maps token id -> its bytes."""
    content = [
        {
            **_chat_token(e.token_id, e.logprob, vocab),
            "top_logprobs": [_chat_token(t, lp, vocab) for t, lp in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob],
    vocab: Sequence[bytes],
    unscored: Sequence[int] = (),
    text_offset: int = 0,
) -> dict[str, Any]:
    """``choices[i].logprobs`` of a completion. ``unscored`` are leading tokens without a
    log-probability (with ``echo``: the first prompt token), ``text_offset`` the character
    offset of the first token in the returned text."""
    tokens = [_text(vocab[t]) for t in unscored] + [_text(vocab[e.token_id]) for e in entries]
    top: list[dict[str, float] | None] = [None] * len(unscored)
    for e in entries:
        alternatives = {_text(vocab[t]): lp for t, lp in e.top}
        alternatives.setdefault(_text(vocab[e.token_id]), e.logprob)
        top.append(alternatives)
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None] * len(unscored) + [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def prompt_logprobs_list(
    entries: Sequence[TokenLogprob], vocab: Sequence[bytes]
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: ``null`` for the first prompt token, then per token a map
    token id -> ``{"logprob", "decoded_token"}`` holding the prompt token and its top
    alternatives (vLLM's ``rank`` is not computed)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for e in entries:
        scored = {t: lp for t, lp in e.top}
        scored.setdefault(e.token_id, e.logprob)
        out.append(
            {str(t): {"logprob": lp, "decoded_token": _text(vocab[t])} for t, lp in scored.items()}
        )
    return out
