"""A ``/v1/responses`` request body mapped onto the chat path it runs as.

The Responses API (https://platform.openai.com/docs/api-reference/responses/create) asks for
what a chat completion asks for under other names: ``input`` (a string, or input items:
``message`` items with ``input_text`` / ``output_text`` parts, ``function_call`` and
``function_call_output`` items, ``reasoning`` items) and ``instructions`` become ``messages``;
``max_output_tokens`` is ``max_completion_tokens``; ``text.format`` is ``response_format``;
function tools ``{"type": "function", "name", ...}`` and ``tool_choice`` take the chat shapes
``{"type": "function", "function": {...}}``; ``reasoning.effort`` becomes the chat template's
thinking switch (``enable_thinking``: false for ``"none"``, true otherwise; the effort itself as
``reasoning_effort`` for templates that read it, as vLLM hands it to gpt-oss). vLLM's
``serving_responses`` maps the same fields. Which body fields are accepted at all is
``body_fields.responses_field_problem``. Every problem is a ValueError naming the field; the
chat path's own checks, which run later on the mapped body, name chat fields, and
``InputMap.rename`` gives their messages the Responses names (``input[i]``, ``text.format``,
``max_output_tokens``, ``tools[i].description``, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..chat.tools import FUNCTION_NAME
from .body_fields import RESPONSES_SAMPLING

# Input item types: the message parts read as text, the item types read at all.
_TEXT_PARTS = ("input_text", "output_text")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


@dataclass(frozen=True)
class ResponseEcho:
    """What the Response object repeats of its request, as JSON text: ``settings`` (tools,
    instructions, sampling and format options: shared by many lines, kept once per distinct
    value) and ``own`` (``metadata``, ``user`` and the like: per line)."""

    settings: str
    own: str

    def fields(self) -> dict[str, Any]:
        return {**json.loads(self.settings), **json.loads(self.own)}


# Chat names in the chat path's messages -> the Responses names, where no index is involved.
_RENAMED = (
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"'?response_format'?( json_schema)?"), "'text.format'"),
    (re.compile(r"^cannot compile json_schema"), "'text.format': cannot compile json_schema"),
    (re.compile(r"'max_tokens' or 'max_completion_tokens'"), "'max_output_tokens'"),
    (re.compile(r"lower max_tokens"), "lower max_output_tokens"),
    (re.compile(r"max_tokens=(\d+)"), r"max_output_tokens=\1"),
    (re.compile(r'\{"type": "function", "function": \{"name": \.\.\.\}\}'),
     '{"type": "function", "name": ...}'),
)  # fmt: skip
_MESSAGE = re.compile(r"\bmessages\[(\d+)\](\.tool_calls\[(\d+)\](\.function)?)?")


@dataclass(frozen=True)
class InputMap:
    """Where each chat message of a Responses request came from: ``messages[k]`` is input
    item ``messages[k]`` (-1: the ``instructions``), its ``tool_calls[j]`` input item
    ``calls[k][j]``."""

    messages: tuple[int, ...] = ()
    calls: tuple[tuple[int, ...], ...] = ()

    def rename(self, problem: str) -> str:
        """A chat-path message about this request, with the Responses field names."""

        def item(match: re.Match[str]) -> str:
            k = int(match.group(1))
            if k >= len(self.messages):
                return match.group(0)
            if match.group(3) is not None:  # a tool call: its own function_call item
                return f"input[{self.calls[k][int(match.group(3))]}]"
            return "'instructions'" if self.messages[k] < 0 else f"input[{self.messages[k]}]"

        problem = _MESSAGE.sub(item, problem)
        for pattern, name in _RENAMED:
            problem = pattern.sub(name, problem)
        return problem.replace("'messages'", "'input'")


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


def _text(where: str, content: Any) -> str | list[dict[str, str]]:
    """A message item's content as chat content (text parts only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(
                f"{where}[{j}].type {_shown(kind)} is not supported: only text parts "
                f"({', '.join(_TEXT_PARTS)}) with a string 'text'"
            )
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _messages(value: Any, instructions: Any) -> tuple[list[dict[str, Any]], InputMap]:
    """``instructions`` and ``input`` as chat messages (function calls merged into the
    assistant turn they follow; a reasoning item's text goes to the next assistant turn), and
    where each came from."""
    out: list[dict[str, Any]] = []
    origin: list[int] = []  # the input item of each message (-1: instructions)
    calls: list[list[int]] = []  # the input item of each of its tool calls
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ValueError("'instructions' must be a string")
        out.append({"role": "system", "content": instructions})
        origin.append(-1)
        calls.append([])
    if isinstance(value, str):
        out.append({"role": "user", "content": value})
        return out, InputMap((*origin, 0), (*map(tuple, calls), ()))
    if not isinstance(value, list) or not value:
        raise ValueError("'input' must be a string or a non-empty list of input items")
    thought: str | None = None
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise ValueError(f"{where}.role must be one of {', '.join(_ROLES)}")
            message = {"role": role, "content": _text(f"{where}.content", item.get("content"))}
            if role == "assistant" and thought is not None:
                message["reasoning_content"], thought = thought, None
            out.append(message)
            origin.append(i)
            calls.append([])
        elif kind == "function_call":
            name, call_id, arguments = (item.get(k) for k in ("name", "call_id", "arguments"))
            if not all(isinstance(v, str) for v in (name, call_id, arguments)):
                raise ValueError(f"{where} needs string 'call_id', 'name' and 'arguments'")
            function = {"name": name, "arguments": arguments}
            call = {"id": call_id, "type": "function", "function": function}
            if not out or out[-1]["role"] != "assistant" or thought is not None:
                out.append({"role": "assistant", "content": None})
                origin.append(i)
                calls.append([])
                if thought is not None:
                    out[-1]["reasoning_content"], thought = thought, None
            out[-1].setdefault("tool_calls", []).append(call)
            calls[-1].append(i)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise ValueError(f"{where}.call_id must be a string")
            content = _text(f"{where}.output", output)
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
            origin.append(i)
            calls.append([])
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts
            ):
                raise ValueError(f"{where}.content must be a list of parts with a string 'text'")
            thought = "\n".join(p["text"] for p in parts)
        else:
            raise ValueError(
                f"{where}.type {_shown(kind)} is not supported; use message, function_call, "
                "function_call_output or reasoning items"
            )
    return out, InputMap(tuple(origin), tuple(map(tuple, calls)))


def _format(text: Any) -> dict[str, Any] | None:
    """``text`` -> the chat ``response_format``."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ValueError("'text' must be an object")
    unknown = sorted(k for k in text if k not in ("format", "verbosity"))
    if unknown:
        raise ValueError(f"unknown field 'text.{unknown[0]}'")
    if text.get("verbosity") not in (None, "medium"):
        raise ValueError(
            f"'text.verbosity' is not supported yet (got {_shown(text['verbosity'])}); remove it"
        )
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise ValueError("'text.format.schema' must be a JSON schema object")
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise ValueError(
        f"'text.format.type' must be text, json_object or json_schema, got {_shown(kind)}"
    )


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses function tools -> chat function tools; built-in tools are errors."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list of function tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise ValueError(
                f"tools[{i}].type {_shown(kind)} is not supported: only function tools "
                '({"type": "function", "name", "parameters", ...}), no built-in tools'
            )
        name = tool.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ValueError(
                f"tools[{i}].name must be 1-64 letters, digits, '_' or '-', got {_shown(name)}"
            )
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise ValueError(f"tools[{i}].parameters must be a JSON schema object")
        keys = ("name", "description", "parameters", "strict")
        out.append({"type": "function", "function": {k: tool[k] for k in keys if k in tool}})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise ValueError(
        f"'tool_choice' of type {_shown(kind)} is not supported; use none, auto, required or "
        '{"type": "function", "name": ...}'
    )


def _thinking(reasoning: Any) -> dict[str, Any] | None:
    """``reasoning`` -> the chat template's variables."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise ValueError("'reasoning' must be an object")
    for key, value in reasoning.items():
        if key != "effort" and value is not None:
            raise ValueError(
                f"'reasoning.{key}' is not supported yet (got {_shown(value)}); the reasoning "
                "item carries the thought as written, in its content"
            )
    effort = reasoning.get("effort")
    if effort is None:
        return None
    if effort not in _EFFORTS:
        raise ValueError(f"'reasoning.effort' must be one of {', '.join(_EFFORTS)}")
    return {"enable_thinking": effort != "none", "reasoning_effort": effort}


def chat_body(body: dict[str, Any]) -> tuple[dict[str, Any], InputMap]:
    """The chat completion body that asks for what the Responses ``body`` asks (its fields
    already checked by ``responses_field_problem``), and where its messages came from. Raises
    ValueError naming the field."""
    chat: dict[str, Any] = {
        k: v for k, v in body.items() if k in RESPONSES_SAMPLING or k == "parallel_tool_calls"
    }
    chat["messages"], origin = _messages(body.get("input"), body.get("instructions"))
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"'max_output_tokens' must be an integer >= 1, got {_shown(limit)}")
        chat["max_completion_tokens"] = limit
    for key, value in (
        ("response_format", _format(body.get("text"))),
        ("tools", _tools(body.get("tools"))),
        ("tool_choice", _tool_choice(body.get("tool_choice"))),
        ("chat_template_kwargs", _thinking(body.get("reasoning"))),
    ):
        if value is not None:
            chat[key] = value
    return chat, origin


def response_echo(body: dict[str, Any]) -> ResponseEcho:
    """What the Response object repeats of ``body``, with OpenAI's defaults where it set
    nothing (a function tool's ``strict`` and ``parameters`` echo as null when not given)."""
    tools = [
        {
            "type": "function",
            "name": t.get("name"),
            **({"description": t["description"]} if "description" in t else {}),
            "parameters": t.get("parameters"),
            "strict": t.get("strict"),
        }
        for t in body.get("tools") or []
    ]
    reasoning = body.get("reasoning") or {}
    settings = {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "tools": tools,
        "tool_choice": body.get("tool_choice") or "auto",  # OpenAI's default, tools or not
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "reasoning": {"effort": reasoning.get("effort"), "summary": None},
        "truncation": "disabled",
    }
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("'metadata' must be an object of string values")
    own: dict[str, Any] = {"metadata": metadata}
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        if body.get(key) is not None:
            if not isinstance(body[key], str):
                raise ValueError(f"'{key}' must be a string, got {_shown(body[key])}")
            own[key] = body[key]
    return ResponseEcho(
        json.dumps(settings, sort_keys=True, ensure_ascii=False),
        json.dumps(own, ensure_ascii=False),
    )
