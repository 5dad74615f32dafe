"""The Response object of an answered ``/v1/responses`` request.

OpenAI's shape (https://platform.openai.com/docs/api-reference/responses/object): ``output``
holds a ``reasoning`` item when the answer has a thought (its text in ``content`` as
``reasoning_text``; no summary is written), a ``message`` item with one ``output_text`` part
for the answer's text, and one ``function_call`` item per tool call (``call_id``, ``name``,
``arguments`` as JSON text), in that order, as the chat answer splits them
(``chat/reply.py``). An answer cut by its token budget has ``status: "incomplete"`` and
``incomplete_details.reason: "max_output_tokens"``. Item ids are derived from the request's
custom_id, so a rerun writes the same ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from ..chat.reply import assistant_message
from ..outputs import AssistantMessage, RequestOutput
from .batch_file import BatchRequest

Decode = Callable[[list[int]], str]


def _id(prefix: str, key: str) -> str:
    return f"{prefix}_{hashlib.sha1(key.encode()).hexdigest()[:24]}"


def reasoning_tokens(
    token_ids: list[int], message: AssistantMessage, end: str, decode: Decode | None
) -> int:
    """How many of the answer's tokens are its thought: the fewest whose text (``decode``,
    special tokens kept) holds the ``end`` marker that closes it, found by bisection (the
    marker may be one token or several); all of them when the thought was never closed; 0
    without a thought or a ``decode``."""
    if message.reasoning_content is None or decode is None:
        return 0
    if end not in decode(token_ids):
        return len(token_ids)
    low, high = 1, len(token_ids)  # decode(token_ids[:high]) holds it
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if end in decode(token_ids[:mid]) else (mid + 1, high)
    return high


def response_body(
    req: BatchRequest, out: RequestOutput, model: str, decode: Decode | None = None
) -> dict[str, Any]:
    """The Response object of ``req`` (a ``/v1/responses`` request: one choice) answered by
    ``out``; ``decode`` (token ids -> text) counts the reasoning tokens."""
    (choice,) = out.outputs
    message, _ = assistant_message(
        choice.text, choice.finish_reason, req.reply, f"{req.custom_id}:0"
    )
    cut = choice.finish_reason == "length"
    status = "incomplete" if cut else "completed"
    output: list[dict[str, Any]] = []
    if message.reasoning_content is not None:
        output.append(
            {
                "type": "reasoning",
                "id": _id("rs", req.custom_id),
                "summary": [],
                "content": [{"type": "reasoning_text", "text": message.reasoning_content}],
                "status": status,
            }
        )
    if message.content is not None or not output and not message.tool_calls:
        text = {"type": "output_text", "text": message.content or "", "annotations": []}
        output.append(
            {
                "type": "message",
                "id": _id("msg", req.custom_id),
                "status": status,
                "role": "assistant",
                "content": [{**text, "logprobs": []}],
            }
        )
    for call in message.tool_calls:
        output.append(
            {
                "type": "function_call",
                "id": _id("fc", call.id),
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
        )
    now = int(time.time())
    echo = req.response_echo.fields() if req.response_echo is not None else {}
    parser = req.reply.reasoning if req.reply is not None else None
    end = parser.end if parser is not None else ""
    thought = reasoning_tokens(choice.token_ids, message, end, decode)
    return {
        "id": _id("resp", req.custom_id),
        "object": "response",
        "created_at": now,
        "completed_at": None if cut else now,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "background": False,
        **echo,
        "usage": {
            "input_tokens": out.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": out.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": out.num_output_tokens,
            "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        },
    }
