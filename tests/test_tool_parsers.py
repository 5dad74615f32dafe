"""Tool-call and reasoning parsers on hand-written answers in each family's published format,
malformed calls included (they stay in the content, nothing raises), and the assistant message
and finish_reason built from them. Pure logic: no model, no tokenizer."""

from __future__ import annotations

import json

import pytest
from chat_formats import FAMILIES
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.chat.reasoning import THINK, detect_reasoning_parser
from prefixbatch.chat.render import ReplyFormat
from prefixbatch.chat.reply import assistant_message
from prefixbatch.chat.tool_parsers import (
    TOOL_CALL_PARSERS,
    ParsedCall,
    detect_tool_parser,
)

HERMES, LLAMA, MISTRAL = (TOOL_CALL_PARSERS[n] for n in ("hermes", "llama3_json", "mistral"))
PARIS = ParsedCall("get_weather", '{"city": "Paris"}')
ROME = ParsedCall("get_time", '{"city": "Rome", "utc": true}')


def hermes_call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (hermes_call("get_weather", '{"city": "Paris"}'), None, [PARIS]),
        (
            "Let me check.\n"
            + hermes_call("get_weather", '{"city": "Paris"}')
            + "\n"
            + hermes_call("get_time", '{"city": "Rome", "utc": true}'),
            "Let me check.",
            [PARIS, ROME],
        ),
        # malformed JSON: that block stays in the content, the good one is still a call
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>\n'
            + hermes_call("get_time", '{"city": "Rome", "utc": true}'),
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
            [ROME],
        ),
        # arguments that are not an object, a call without a name: content
        (hermes_call("f", "[1, 2]"), hermes_call("f", "[1, 2]"), []),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
        # arguments as JSON text (some models write them so) are decoded
        (
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'
            "</tool_call>",
            None,
            [PARIS],
        ),
        # the last call cut before its closing tag still parses when its JSON is whole
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"ci', None, []),
        ("Just text.", "Just text.", []),
    ],
)
def test_hermes(text, content, calls):  # type: ignore[no-untyped-def]
    got_content, got_calls = HERMES.parse(text)
    assert got_calls == calls
    assert got_content == (text if not calls and content is None else content)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "arguments": {"city": "Rome", "utc": true}}',
            None,
            [PARIS, ROME],
        ),
        # a call then a malformed one: the malformed one is the content
        (
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "par',
            '{"name": "get_time", "par',
            [PARIS],
        ),
        ('The weather is {"name": "x"}', 'The weather is {"name": "x"}', []),
        (
            '{"name": "get_weather", "parameters": 3}',
            '{"name": "get_weather", "parameters": 3}',
            [],
        ),
        ("{not json", "{not json", []),
    ],
)
def test_llama3_json(text, content, calls):  # type: ignore[no-untyped-def]
    assert LLAMA.parse(text) == (content, calls)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS]),
        (
            'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "arguments": {"city": "Rome", "utc": true}}]',
            "Sure.",
            [PARIS, ROME],
        ),
        # v11: name[ARGS]{...} per call
        (
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
            '[TOOL_CALLS]get_time[ARGS]{"city": "Rome", "utc": true}',
            None,
            [PARIS, ROME],
        ),
        # one bad item spoils the list (it is one unit): all of it is content
        (
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"nam": 1}]',
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"nam": 1}]',
            [],
        ),
        ('[TOOL_CALLS] [{"name": "get_weather", "argu', None, []),
        ("No calls here.", "No calls here.", []),
    ],
)
def test_mistral(text, content, calls):  # type: ignore[no-untyped-def]
    got_content, got_calls = MISTRAL.parse(text)
    assert got_calls == calls
    assert got_content == (text if not calls and content is None else content)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}", fullmatch=True)
json_objects = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(
    parser=st.sampled_from(list(TOOL_CALL_PARSERS.values())),
    calls=st.lists(st.tuples(names, json_objects), min_size=1, max_size=3),
)
def test_calls_written_in_the_grammar_syntax_parse_back(parser, calls):  # type: ignore[no-untyped-def]
    """What the forced-call grammar lets a model write, the same family's parser reads."""
    syntax = parser.syntax
    text = (
        syntax.opening
        + syntax.separator.join(
            syntax.call_begin + name + syntax.name_end + json.dumps(args) + syntax.call_end
            for name, args in calls
        )
        + syntax.closing
    )
    content, parsed = parser.parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls


PIECES = list('{}[]";:, \nabc<>/_TOOLCAS') + [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    '"name"',
    '"arguments"',
    "<think>",
    "</think>",
]


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_parsers_never_raise(text):  # type: ignore[no-untyped-def]
    for parser in TOOL_CALL_PARSERS.values():
        content, calls = parser.parse(text)
        assert content is None or isinstance(content, str)
        assert all(isinstance(json.loads(c.arguments), dict) for c in calls)
    reasoning, content = THINK.split(text, opened=False)
    assert reasoning is None or THINK.end not in reasoning


@pytest.mark.parametrize(
    ("text", "opened", "split"),
    [
        ("<think>\nHmm, Paris.\n</think>\n\nParis.", False, ("Hmm, Paris.", "Paris.")),
        ("Hmm, Paris.\n</think>\n\nParis.", True, ("Hmm, Paris.", "Paris.")),
        ("Hmm, still thinking", True, ("Hmm, still thinking", None)),  # cut by max_tokens
        ("<think>\nHmm", False, ("Hmm", None)),
        ("Paris.", False, (None, "Paris.")),
        ("<think>\n\n</think>\n\nParis.", False, (None, "Paris.")),
        ("\n\nParis.", False, (None, "\n\nParis.")),  # no thought: the text is unchanged
    ],
)
def test_reasoning_split(text, opened, split):  # type: ignore[no-untyped-def]
    assert THINK.split(text, opened) == split


def test_the_prompt_says_whether_a_thought_is_open():
    assert THINK.opens("<｜User｜>Hi<｜Assistant｜><think>\n")
    assert not THINK.opens("<|im_start|>assistant\n")
    assert not THINK.opens("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert not THINK.opens("<think>\nold\n</think>\n\nold answer<|im_start|>assistant\n")


def test_families_are_detected_from_their_templates():
    detected = {f: detect_tool_parser(spec.chat_template()) for f, spec in FAMILIES.items()}
    assert detected["qwen3"] is HERMES and detected["llama3_json"] is LLAMA
    assert detected["mistral"] is MISTRAL and detected["deepseek_r1"] is None
    assert detect_reasoning_parser(FAMILIES["qwen3"].chat_template()) is THINK
    assert detect_reasoning_parser(FAMILIES["deepseek_r1"].chat_template()) is THINK
    assert detect_reasoning_parser(FAMILIES["mistral"].chat_template()) is None
    smol = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    assert detect_tool_parser(smol) is None and detect_reasoning_parser(smol) is None


def test_assistant_message_and_finish_reason():
    reply = ReplyFormat(HERMES, THINK, thought_open=False)
    text = "<think>\nThey want weather.\n</think>\n\n" + hermes_call(
        "get_weather", '{"city": "Paris"}'
    )
    message, finish = assistant_message(text, "stop", reply, "req-1:0")
    assert finish == "tool_calls" and message.content is None
    assert message.reasoning_content == "They want weather."
    (call,) = message.tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert (
        call.id.startswith("call_")
        and call.id == assistant_message(text, "stop", reply, "req-1:0")[0].tool_calls[0].id
    )
    two = hermes_call("get_weather", '{"city": "Paris"}') + "\n" + hermes_call("get_time", "{}")
    message, _ = assistant_message(two, "stop", ReplyFormat(HERMES), "k")
    assert len({c.id for c in message.tool_calls}) == 2
    single, _ = assistant_message(two, "stop", ReplyFormat(HERMES, parallel_tool_calls=False), "k")
    assert [c.name for c in single.tool_calls] == ["get_weather"]
    # cut by max_tokens: the finished call is returned, the reason stays "length"
    cut = hermes_call("get_weather", '{"city": "Paris"}') + '\n<tool_call>\n{"name": "get_t'
    message, finish = assistant_message(cut, "length", ReplyFormat(HERMES), "k")
    assert finish == "length" and len(message.tool_calls) == 1
    assert message.content == '<tool_call>\n{"name": "get_t'
    mistral, _ = assistant_message(
        '[TOOL_CALLS][{"name": "f", "arguments": {}}]', "stop", ReplyFormat(MISTRAL), "k"
    )
    assert len(mistral.tool_calls[0].id) == 9 and mistral.tool_calls[0].id.isalnum()
    plain, finish = assistant_message("Hello", "stop", None, "k")
    assert plain.to_openai() == {"role": "assistant", "content": "Hello", "refusal": None}
    assert finish == "stop"
