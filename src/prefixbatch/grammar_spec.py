"""What a request's output must match: OpenAI's ``response_format`` and vLLM's guided fields,
normalised into one hashable value (compiled by ``structured.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from .optional import missing

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "structural_tag"]
GRAMMAR_FEATURE = "structured output (response_format, guided_choice, guided_regex, tools)"


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match, in a hashable, picklable form (it travels to Ray
    workers inside ``SamplingParams``). ``source`` is the JSON schema text, the regex, the
    JSON list of choices, or an xgrammar structural tag as JSON (tool calls: built by
    ``tool_grammar.py``); empty for ``json_object``."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def from_request(
        cls,
        response_format: dict[str, Any] | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_regex: str | None = None,
    ) -> GrammarSpec | None:
        """The spec for a request body's fields; None for free text. Raises ValueError for a
        malformed or conflicting specification (OpenAI's ``response_format`` shapes:
        https://platform.openai.com/docs/api-reference/chat/create#chat-create-response_format).
        """
        given = [x is not None for x in (response_format, guided_choice, guided_regex)]
        if sum(given) > 1:
            raise ValueError("use only one of response_format, guided_choice, guided_regex")
        if guided_choice is not None:
            if not guided_choice or not all(isinstance(c, str) for c in guided_choice):
                raise ValueError("guided_choice must be a non-empty list of strings")
            return cls("choice", json.dumps(list(guided_choice)))
        if guided_regex is not None:
            return cls("regex", guided_regex)
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema (object)")
            return cls("json_schema", json.dumps(schema))
        raise ValueError(f"unsupported response_format type {json.dumps(kind)}")

    def check(self) -> None:
        """Raise ValueError when the schema or regex cannot be compiled, or xgrammar (which
        compiles it) is not installed, before any compute (a parse without the tokenizer,
        about a millisecond, cached by spec)."""
        problem = _problem(self)
        if problem:
            raise ValueError(problem)


@lru_cache(maxsize=1024)
def _problem(spec: GrammarSpec) -> str | None:
    absent = missing("xgrammar", GRAMMAR_FEATURE)
    if absent:
        return absent
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.source, any_whitespace=False)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.source)
        elif spec.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(spec.source)
    except (RuntimeError, ValueError) as e:  # xgrammar reports bad input as either
        return f"cannot compile {spec.kind}: {compile_error(e)}"
    return None


def compile_error(e: Exception) -> str:
    """The first line of an xgrammar error, without the C++ source location it starts with."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return detail.split(": ", 1)[-1] if "] " in detail else detail
