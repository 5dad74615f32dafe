"""Tool calls out of an answer's text, one parser per model family's published format, named as
vLLM names its tool parsers (``--tool-call-parser``):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per
  call (Hermes 2/3, Qwen2.5 and Qwen3: https://qwen.readthedocs.io/en/latest/framework/
  function_call.html);
- ``llama3_json``: the answer is ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, several separated by ``;`` (Llama 3.1/3.2 JSON tool calling:
  https://www.llama.com/docs/model-cards-and-prompt-formats/llama3_1/);
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (Mistral's v3
  tokenizer format), or ``[TOOL_CALLS]name[ARGS]{...}`` per call (its v11 format).

A parser never raises: a call that is not valid JSON, lacks a name or has arguments that are not
an object stays in ``content`` as the model wrote it, and the other calls are still returned.
Each parser also gives the call syntax its forced calls are constrained to (``CallSyntax``) and
the template text that identifies its family.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..execution.tool_grammar import CallSyntax


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as JSON text of an object."""

    name: str
    arguments: str


def as_call(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """A call from a decoded ``{"name": ..., <one of keys>: {...}}`` (arguments may also be
    JSON text of an object), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[k] for k in keys if k in obj), None)
    if isinstance(arguments, str):
        arguments = _only_json(arguments)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


# Control characters inside strings are accepted (xgrammar's string rules with a length bound
# let them through); the arguments are written out again escaped, as valid JSON.
_DECODER = json.JSONDecoder(strict=False)


def _decode(text: str, at: int = 0) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[at]`` and where it ends, else None."""
    try:
        return _DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        return None


def _only_json(text: str) -> Any:
    """The JSON value ``text`` holds and nothing else (whitespace aside), else None."""
    text = text.strip()
    decoded = _decode(text)
    return decoded[0] if decoded and decoded[1] == len(text) else None


def _content(pieces: list[str]) -> str | None:
    text = "".join(pieces).strip()
    return text or None


class ToolCallParser:
    """Splits an answer into content and calls. ``template_markers``: text of a chat template
    that identifies the family; ``text_markers``: text the parser reads, so it must stay in the
    decoded output even where it is a special token."""

    name = ""
    syntax: CallSyntax
    template_markers: tuple[str, ...] = ()
    text_markers: tuple[str, ...] = ()

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls); without calls the content is ``text`` unchanged, with calls it is
        the text outside them, stripped, or None when there is none."""
        raise NotImplementedError

    def call_id(self, key: str) -> str:
        """A call id derived from ``key`` (OpenAI's ``call_`` form)."""
        return "call_" + hashlib.sha1(key.encode()).hexdigest()[:24]

    def syntax_for(self, template: str) -> CallSyntax:
        """The call syntax forced calls take under this chat template."""
        return self.syntax


class HermesParser(ToolCallParser):
    name = "hermes"
    syntax = CallSyntax('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>", "\n")
    template_markers = ("<tool_call>",)
    text_markers = ("<tool_call>", "</tool_call>")
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)  # an unclosed last one too

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        pieces, calls, at = [], [], 0
        for m in self._CALL.finditer(text):
            call = as_call(_only_json(m.group(1)))
            if call is None:
                continue  # malformed: stays in the content
            pieces.append(text[at : m.start()])
            calls.append(call)
            at = m.end()
        if not calls:
            return text, []
        return _content([*pieces, text[at:]]), calls


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    syntax = CallSyntax('{"name": "', '", "parameters": ', "}", "; ")
    template_markers = ("<|python_tag|>", "dictionary of argument name and its value")
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.lstrip()
        body = body.removeprefix(self._TAG).lstrip()
        calls, at = [], 0
        while at < len(body) and body[at] == "{":
            decoded = _decode(body, at)
            call = as_call(decoded[0], ("parameters", "arguments")) if decoded else None
            if call is None or decoded is None:
                break
            calls.append(call)
            at = decoded[1]
            follow = re.match(r"\s*;\s*(?=\{)|\s*", body[at:])
            at += follow.end() if follow else 0
        if not calls:
            return text, []
        return _content([body[at:]]), calls


class MistralParser(ToolCallParser):
    name = "mistral"
    syntax = CallSyntax('{"name": "', '", "arguments": ', "}", ", ", "[TOOL_CALLS][", "]")
    SYNTAX_V11 = CallSyntax("[TOOL_CALLS]", "[ARGS]", "", "")
    template_markers = ("[TOOL_CALLS]",)
    text_markers = ("[TOOL_CALLS]", "[ARGS]")
    _MARK, _ARGS = "[TOOL_CALLS]", "[ARGS]"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find(self._MARK)
        if at < 0:
            return text, []
        calls, rest = self._calls(text[at + len(self._MARK) :])
        if not calls:
            return text, []
        return _content([text[:at], rest]), calls

    def _calls(self, after: str) -> tuple[list[ParsedCall], str]:
        """The calls after the first marker and the text left after them."""
        body = after.lstrip()
        if body.startswith("["):  # v3: a JSON list, one unit: all its calls or none
            decoded = _decode(body)
            items = decoded[0] if decoded and isinstance(decoded[0], list) else []
            listed = [as_call(item) for item in items]
            calls = [c for c in listed if c is not None]
            if decoded is None or not calls or len(calls) < len(listed):
                return [], after
            return calls, body[decoded[1] :]
        calls = []
        for part in after.split(self._MARK):  # v11: name[ARGS]{...} per call
            name, sep, args = part.partition(self._ARGS)
            call = as_call({"name": name.strip(), "arguments": _only_json(args)}) if sep else None
            if call is None or not call.name:
                return [], after
            calls.append(call)
        return calls, ""

    def call_id(self, key: str) -> str:
        """Mistral's templates take 9 letters or digits."""
        return hashlib.sha1(key.encode()).hexdigest()[:9]

    def syntax_for(self, template: str) -> CallSyntax:
        """The v11 form when the template writes ``[ARGS]``, else the v3 JSON list."""
        return self.SYNTAX_V11 if self._ARGS in template else self.syntax


TOOL_CALL_PARSERS: dict[str, ToolCallParser] = {
    p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())
}


def detect_tool_parser(template: str) -> ToolCallParser | None:
    """The parser of the family whose markers the chat template holds, else None."""
    for parser in TOOL_CALL_PARSERS.values():
        if any(marker in template for marker in parser.template_markers):
            return parser
    return None
