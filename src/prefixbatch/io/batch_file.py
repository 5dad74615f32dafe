"""Read an OpenAI Batch API input file (or the minimal ``{"custom_id", "prompt"}`` form).

Every line yields exactly one ``BatchRequest`` or one ``LineError``; nothing in a line can stop
the others from being read. Blank lines are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sampling_params import SamplingParams

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str  # CHAT_URL or COMPLETIONS_URL
    messages: list[dict[str, Any]] | None
    prompt: str | list[int] | None
    params: SamplingParams
    model: str | None = None


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    message: str
    code: str = "invalid_request"


class _Invalid(ValueError):
    pass


def read_batch_file(
    path: Path, default_max_tokens: int = 256
) -> Iterator[BatchRequest | LineError]:
    """Parse ``path`` line by line; undecodable bytes are an error for that line only."""
    seen: set[str] = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield LineError(number, None, f"line {number}: not valid UTF-8 ({e.reason})")
                continue
            if not text.strip():
                continue
            yield parse_line(text, number, seen, default_max_tokens)


def parse_line(
    text: str, number: int, seen: set[str], default_max_tokens: int = 256
) -> BatchRequest | LineError:
    """One line -> a request or an error; ``seen`` tracks custom_ids for duplicate detection."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return LineError(number, None, f"line {number}: invalid JSON: {e}")
    if not isinstance(obj, dict):
        return LineError(
            number, None, f"line {number}: expected a JSON object, got {type(obj).__name__}"
        )
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, None, f"line {number}: 'custom_id' must be a non-empty string")
    if custom_id in seen:
        return LineError(number, custom_id, f"line {number}: duplicate custom_id {custom_id!r}")
    seen.add(custom_id)
    try:
        return _request(obj, number, custom_id, default_max_tokens)
    except _Invalid as e:
        return LineError(number, custom_id, f"line {number}: {e}")


def _request(
    obj: dict[str, Any], number: int, custom_id: str, default_max_tokens: int
) -> BatchRequest:
    if "body" in obj or "url" in obj:
        method = obj.get("method", "POST")
        if method != "POST":
            raise _Invalid(f"'method' must be POST, got {method!r}")
        url = obj.get("url")
        if url not in (CHAT_URL, COMPLETIONS_URL):
            raise _Invalid(f"unsupported url {url!r}; use {CHAT_URL} or {COMPLETIONS_URL}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _Invalid("'body' must be a JSON object")
    else:  # minimal form: sampling fields sit next to the prompt
        url, body = (CHAT_URL if "messages" in obj else COMPLETIONS_URL), obj
    messages = prompt = None
    if url == CHAT_URL:
        messages = _messages(body.get("messages"))
    else:
        prompt = _prompt(body.get("prompt"))
    model = body.get("model")
    return BatchRequest(
        number,
        custom_id,
        url,
        messages,
        prompt,
        _params(body, default_max_tokens),
        model if isinstance(model, str) else None,
    )


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _Invalid("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Invalid(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise _Invalid(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _Invalid(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise _Invalid("the prompt is empty: every message has empty content")
    return out


def _prompt(value: Any) -> str | list[int]:
    if value == "" or value == []:
        raise _Invalid("the prompt is empty")
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return value
    if value is None:
        raise _Invalid("missing 'prompt' (or 'messages' for chat)")
    raise _Invalid("'prompt' must be a string or a list of token ids (one prompt per line)")


def _number(body: dict[str, Any], key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"'{key}' must be a number, got {value!r}")
    return value


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"'{key}' must be an integer, got {value!r}")
    return value


def _params(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise _Invalid(f"'max_tokens' must be at least 1, got {max_tokens}")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0 or temperature > 2:  # type: ignore[operator]
        raise _Invalid(f"'temperature' must be in [0, 2], got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:  # type: ignore[operator]
        raise _Invalid(f"'top_p' must be in (0, 1], got {top_p}")
    top_k = _integer(body, "top_k") or 0
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _Invalid(f"'n' must be 1, got {n}")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise _Invalid("'stop' must be a string or a list of non-empty strings")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise _Invalid("'stop_token_ids' must be a list of integers")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _Invalid("'ignore_eos' must be true or false")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),  # type: ignore[arg-type]
        top_k=top_k,
        seed=_integer(body, "seed"),
        stop=stop,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=ignore_eos,
    )
