"""A chat request's ``messages`` and ``chat_template_kwargs``, checked before any compute.

Messages keep what OpenAI and vLLM hand a chat template (OpenAI's message shapes:
https://platform.openai.com/docs/api-reference/chat/create#chat-create-messages): ``role``,
``content`` (a string, a list of text parts, or null for an assistant turn that calls tools),
``name``, an assistant turn's ``tool_calls`` (``{"id", "type": "function", "function": {"name",
"arguments"}}``, arguments as JSON text of an object, or the object itself: templates get the
object) and its
``reasoning_content`` (or vLLM's ``reasoning``), and a tool turn's ``tool_call_id``. Other keys
are dropped. Whether the template can render tool calls is checked when it renders
(``render.py``); how they are handed to it is ``tokenizer.normalise_messages``.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from typing import Any

from ..tokenizer import message_text

# Keys a message keeps, and the type each must have (content is checked on its own).
_STRING_FIELDS = ("name", "tool_call_id", "reasoning_content", "reasoning")


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    """A history's tool call with its arguments decoded into an object, as templates expect
    them (vLLM decodes them too; empty arguments are ``{}``)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f'{where} must be {{"type": "function", "function": {{"name", ...}}}}')
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not JSON: {e.msg}") from e
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must encode a JSON object")
    if "id" in call and not isinstance(call["id"], str):
        raise ValueError(f"{where}.id must be a string, got {_shown(call['id'])}")
    return {**call, "type": "function", "function": {**function, "arguments": arguments}}


def _message(i: int, m: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ValueError(f"{where} must be an object with a string 'role'")
    calls = m.get("tool_calls")
    if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
        raise ValueError(f"{where}.tool_calls must be a list, on an assistant message")
    out: dict[str, Any] = {"role": m["role"]}
    if m.get("content") is None:
        if not calls:
            raise ValueError(
                f"{where}.content is null: only an assistant message with tool_calls may "
                "leave it out"
            )
        out["content"] = None
    else:
        try:
            out["content"] = message_text(m["content"])
        except ValueError as e:
            raise ValueError(f"{where}.content: {e}") from e
    if calls:
        out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
    for key in _STRING_FIELDS:
        if m.get(key) is not None:
            if not isinstance(m[key], str):
                raise ValueError(f"{where}.{key} must be a string, got {_shown(m[key])}")
            out[key] = m[key]
    return out


def check_messages(value: Any) -> list[dict[str, Any]]:
    """The messages as the chat template will get them (before ``normalise_messages``).
    Raises ValueError naming the first bad message and field, or for a conversation whose
    messages are all empty."""
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    out = [_message(i, m) for i, m in enumerate(value)]
    if not any((m["content"] or "").strip() or m.get("tool_calls") for m in out):
        raise ValueError("the prompt is empty: every message has empty content")
    return out


@lru_cache(maxsize=1)
def reserved_template_kwargs() -> frozenset[str]:
    """The names a template kwarg may not take: ``apply_chat_template``'s own arguments and
    the ``messages`` variable it sets (read from transformers' signature)."""
    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD and n != "self"}
    return frozenset(named | {"messages"})


def check_template_kwargs(value: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` (vLLM's field: extra variables for the chat template, such as
    Qwen3's ``enable_thinking``). Raises ValueError for a value that is not an object or that
    names one of ``apply_chat_template``'s own arguments."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'chat_template_kwargs' must be an object, got {_shown(value)}")
    clash = sorted(reserved_template_kwargs() & value.keys())
    if clash:
        raise ValueError(
            f"'chat_template_kwargs' cannot set {_shown(clash[0])}: it is a request field or "
            "an argument of the template call itself"
        )
    return dict(value)
