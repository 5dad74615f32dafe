"""The grammar of an answer that must call tools (``tool_choice`` ``"required"`` or a named
function): one or more calls in the model family's own syntax, each call's arguments valid
against its function's ``parameters`` JSON schema, nothing else but an optional leading thought.

It is an xgrammar structural tag (https://xgrammar.mlc.ai/docs/tutorials/structural_tag.html):
each function is a tag whose begin string ends with the call's opening up to the arguments
(``<tool_call>\\n{"name": "get_weather", "arguments": ``), whose content is the parameters'
grammar and whose end closes the call; the tags repeat with the family's separator. vLLM and
SGLang constrain forced tool calls the same way. The arguments' grammar is xgrammar's JSON
schema grammar with fixed whitespace (``", "`` and ``": "``), as for ``response_format``, so a
small model cannot loop on newlines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..grammar_spec import GRAMMAR_FEATURE, GrammarSpec, compile_error
from ..optional import missing


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes tool calls: ``opening``, then calls separated by
    ``separator``, then ``closing``; a call is ``call_begin + name + name_end``, the arguments
    object, then ``call_end``."""

    call_begin: str
    name_end: str
    call_end: str
    separator: str
    opening: str = ""
    closing: str = ""


@dataclass(frozen=True)
class ThoughtSyntax:
    """A reasoning block ``start ... end`` that may come first; ``opened`` when the prompt
    ends inside it (the chat template wrote ``start``), so the answer only closes it."""

    start: str
    end: str
    opened: bool


def _arguments_grammar(name: str, schema: str) -> str:
    absent = missing("xgrammar", GRAMMAR_FEATURE)
    if absent:  # a line error, like every other structured request without xgrammar
        raise ValueError(absent)
    import xgrammar as xgr

    try:
        return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    except (RuntimeError, ValueError) as e:  # xgrammar reports bad input as either
        raise ValueError(
            f"cannot compile the parameters of tool {json.dumps(name)}: {compile_error(e)}"
        ) from e


@lru_cache(maxsize=64)
def tool_call_grammar(
    syntax: CallSyntax,
    functions: tuple[tuple[str, str], ...],
    parallel: bool,
    thought: ThoughtSyntax | None = None,
) -> GrammarSpec:
    """The grammar of calls to ``functions`` ((name, parameters JSON schema text) pairs, at
    least one): one call, or with ``parallel`` one or more. Cached, so requests that share
    their tools share one spec (and one compiled grammar). Raises ValueError naming a
    function whose parameters are not a schema xgrammar compiles."""
    if not functions:
        raise ValueError("a forced tool call needs at least one function")
    tags = [
        {
            "type": "tag",
            "begin": syntax.call_begin + name + syntax.name_end,
            "content": {"type": "grammar", "grammar": _arguments_grammar(name, schema)},
            "end": syntax.call_end,
        }
        for name, schema in functions
    ]
    calls = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": syntax.separator,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    elements: list[dict[str, Any]] = []
    if thought is not None:
        block: dict[str, Any] = {
            "type": "tag",
            "begin": "" if thought.opened else thought.start,
            "content": {"type": "any_text", "excludes": [thought.start, thought.end]},
            "end": thought.end,
        }
        if not thought.opened:
            block = {"type": "optional", "content": block}
        elements += [block, {"type": "regex", "pattern": r"\n{0,2}"}]
    if syntax.opening:
        elements.append({"type": "const_string", "value": syntax.opening})
    elements.append(calls)
    if syntax.closing:
        elements.append({"type": "const_string", "value": syntax.closing})
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": elements}}
    spec = GrammarSpec("structural_tag", json.dumps(tag))
    spec.check()
    return spec
