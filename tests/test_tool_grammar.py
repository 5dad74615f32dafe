"""The grammar of forced tool calls, through the engine's grammar wrapper on each family's
tokenizer: it accepts the family's calls and nothing else, and a random walk through its token
masks always ends in calls the family's parser reads and whose arguments validate (jsonschema)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from chat_formats import TOOL_SCHEMAS, save_chat_tokenizer

from prefixbatch.chat.reasoning import THINK
from prefixbatch.chat.tool_parsers import TOOL_CALL_PARSERS, MistralParser, ToolCallParser
from prefixbatch.execution.structured import StructuredOutput
from prefixbatch.execution.tool_grammar import CallSyntax, tool_call_grammar
from prefixbatch.tokenizer import Tokenizer

FUNCTIONS = tuple((name, json.dumps(schema)) for name, schema in TOOL_SCHEMAS.items())
PARSER_FAMILY = {"hermes": "qwen3", "llama3_json": "llama3_json", "mistral": "mistral"}


@pytest.fixture(scope="module")
def grammars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StructuredOutput]:
    out = {}
    for parser, family in PARSER_FAMILY.items():
        path = tmp_path_factory.mktemp(family)
        save_chat_tokenizer(path, family)
        tok = Tokenizer(path)
        out[parser] = StructuredOutput(tok.hf, len(tok.hf), [tok.eos_token_id])
    return out


def write(syntax: CallSyntax, calls: list[tuple[str, dict]]) -> str:  # type: ignore[type-arg]
    """Calls as the family writes them, with the grammar's fixed whitespace."""
    return (
        syntax.opening
        + syntax.separator.join(
            syntax.call_begin + name + syntax.name_end + json.dumps(args) + syntax.call_end
            for name, args in calls
        )
        + syntax.closing
    )


SYNTAXES = [(name, parser.syntax) for name, parser in TOOL_CALL_PARSERS.items()] + [
    ("mistral", MistralParser.SYNTAX_V11)
]


@pytest.mark.parametrize(("parser", "syntax"), SYNTAXES)
def test_the_family_calls_pass_and_prose_does_not(grammars, parser, syntax):  # type: ignore[no-untyped-def]
    structured = grammars[parser]
    spec = tool_call_grammar(syntax, FUNCTIONS, parallel=True)
    calls = [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": 2})]
    matcher = structured.matcher(spec)
    assert matcher.accept_string(write(syntax, calls))
    assert matcher.accept_token(2) and matcher.is_terminated()  # then EOS ends it
    for bad in (
        "Sure! " + write(syntax, calls[:1]),  # prose first
        write(syntax, [("get_weather", {"city": "Paris"})]),  # a required field missing
        write(syntax, [("get_news", {})]),  # not a tool
    ):
        assert not structured.matcher(spec).accept_string(bad), bad
    empty = structured.matcher(spec)
    assert not empty.accept_token(2)  # at least one call


def test_named_and_single_calls(grammars):  # type: ignore[no-untyped-def]
    syntax = TOOL_CALL_PARSERS["hermes"].syntax
    structured = grammars["hermes"]
    named = tool_call_grammar(syntax, FUNCTIONS[1:], parallel=False)
    assert not structured.matcher(named).accept_string(write(syntax, [("get_weather", {})]))
    matcher = structured.matcher(named)
    assert matcher.accept_string(write(syntax, [("get_time", {"zone": -3})]))
    assert not matcher.accept_string(syntax.separator)  # one call only: then EOS
    assert matcher.accept_token(2)


def test_a_thought_may_come_first(grammars):  # type: ignore[no-untyped-def]
    syntax = TOOL_CALL_PARSERS["hermes"].syntax
    call = write(syntax, [("get_time", {"zone": 1})])
    structured = grammars["hermes"]
    opened = tool_call_grammar(syntax, FUNCTIONS, True, THINK.syntax(opened=True))
    assert structured.matcher(opened).accept_string("Time zones...\n</think>\n\n" + call)
    unclosed = structured.matcher(opened)
    assert unclosed.accept_string(call) and not unclosed.accept_token(2)  # still thinking
    closed = tool_call_grammar(syntax, FUNCTIONS, True, THINK.syntax(opened=False))
    assert structured.matcher(closed).accept_string(call)
    assert structured.matcher(closed).accept_string("<think>\nHm.\n</think>\n\n" + call)


def test_parameters_that_do_not_compile_name_their_tool():
    syntax = TOOL_CALL_PARSERS["hermes"].syntax
    bad = (("broken", json.dumps({"type": "object", "properties": {"x": {"type": "nope"}}})),)
    with pytest.raises(ValueError, match='parameters of tool "broken"'):
        tool_call_grammar(syntax, bad, parallel=True)


def walk(structured: StructuredOutput, spec, rng: random.Random, limit: int = 400) -> str | None:  # type: ignore[no-untyped-def]
    """A random answer the grammar allows: each token drawn uniformly from its mask, until EOS
    (None if ``limit`` tokens pass first)."""
    matcher = structured.matcher(spec)
    tok = structured.info
    ids: list[int] = []
    shifts = torch.arange(32, dtype=torch.int32)
    for _ in range(limit):
        words = structured.fill([matcher], [0], structured.allocate(1))[0]
        bits = ((words.unsqueeze(-1) >> shifts) & 1).flatten()[: structured.vocab_size]
        token = rng.choice(bits.nonzero().flatten().tolist())
        assert matcher.accept_token(token)
        if token in tok.stop_token_ids:
            return b"".join(tok.decoded_vocab[t] for t in ids).decode("utf-8", "replace")
        ids.append(token)
    return None


@pytest.mark.parametrize("parser", list(TOOL_CALL_PARSERS))
def test_random_answers_of_the_grammar_parse_and_validate(grammars, parser):  # type: ignore[no-untyped-def]
    family: ToolCallParser = TOOL_CALL_PARSERS[parser]
    spec = tool_call_grammar(family.syntax, FUNCTIONS, parallel=True)
    rng = random.Random(7)
    finished = 0
    for _ in range(12):
        text = walk(grammars[parser], spec, rng)
        if text is None:
            continue
        finished += 1
        content, calls = family.parse(text)
        assert calls and content is None, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[call.name])
    assert finished >= 6
