"""A chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked and normalised.

The shapes are OpenAI's Chat Completions ones
(https://platform.openai.com/docs/api-reference/chat/create#chat-create-tools): a tool is
``{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}``;
``tool_choice`` is ``"none"``, ``"auto"`` (the default when tools are given), ``"required"`` or
``{"type": "function", "function": {"name": ...}}``. The tools reach the chat template as written
(transformers' ``apply_chat_template(tools=...)`` takes this shape).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a function without ``parameters`` takes: nothing (OpenAI: "an empty parameter list").
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

ToolChoice = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one chat request. ``choice`` is ``"function"`` when ``tool_choice`` names
    one (``function`` holds its name); ``parallel`` is ``parallel_tool_calls``."""

    tools: tuple[dict[str, Any], ...]
    choice: ToolChoice = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        """Whether the answer's tool calls are extracted (every choice but ``"none"``)."""
        return self.choice != "none"

    @property
    def forces_calls(self) -> bool:
        """Whether decoding is constrained to tool calls (``"required"`` or a named one)."""
        return self.choice in ("required", "function")

    def signatures(self) -> tuple[tuple[str, str], ...]:
        """(name, parameters JSON schema as text) of each function a forced answer may call:
        the named one, or all for ``"required"``."""
        out = []
        for tool in self.tools:
            function = tool["function"]
            if self.choice == "function" and function["name"] != self.function:
                continue
            schema = function.get("parameters") or NO_PARAMETERS
            out.append((function["name"], json.dumps(schema, sort_keys=True)))
        return tuple(out)

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template receives them."""
        return list(self.tools)


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


def _tool(i: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise ValueError(
            f'{where} must be {{"type": "function", "function": {{...}}}}, got type '
            f"{_shown(kind)} (only function tools are supported)"
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise ValueError(
            f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {_shown(name)}"
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.function.description must be a string")
    return tool


def _choice(value: Any, names: list[str]) -> tuple[ToolChoice, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if value in ("none", "auto", "required"):
        return value, None
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        name = value["function"]["name"]
        if name not in names:
            raise ValueError(f"'tool_choice' names the function {_shown(name)}, not in 'tools'")
        return "function", name
    raise ValueError(
        '\'tool_choice\' must be "none", "auto", "required" or '
        f'{{"type": "function", "function": {{"name": ...}}}}, got {_shown(value)}'
    )


def parse_tools(tools: Any, tool_choice: Any = None, parallel: Any = None) -> ToolRequest | None:
    """The request's tools, or None when it has none (``tools`` absent or empty and a
    ``tool_choice`` that asks for no call). Raises ValueError naming the first bad field."""
    if tools is not None and not isinstance(tools, list):
        raise ValueError("'tools' must be a list of function tools")
    checked = [_tool(i, t) for i, t in enumerate(tools or [])]
    names = [t["function"]["name"] for t in checked]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"'tools' defines the function {_shown(duplicate)} twice")
    if parallel is not None and not isinstance(parallel, bool):
        raise ValueError(f"'parallel_tool_calls' must be true or false, got {_shown(parallel)}")
    if not names and (tool_choice == "required" or isinstance(tool_choice, dict)):
        raise ValueError("'tool_choice' asks for a tool call but the request has no 'tools'")
    choice, function = _choice(tool_choice, names)
    if not names:
        return None
    return ToolRequest(tuple(checked), choice, function, True if parallel is None else parallel)
