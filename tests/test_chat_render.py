"""Chat requests through each family's chat template (tokenizers only, no model): tools and
tool-call histories render as the template writes them or give a line error that says why,
thinking follows ``chat_template_kwargs``, the forced-call grammar and the kept special tokens
are decided per request, and a shared tools block is a shared prefix of the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_formats import FAMILIES, save_chat_tokenizer

from conftest import save_tokenizer
from prefixbatch.chat.messages import check_messages
from prefixbatch.chat.render import ChatOptions, ChatRequest, ChatSetup
from prefixbatch.chat.tools import parse_tools
from prefixbatch.grammar_spec import GrammarSpec
from prefixbatch.io.batch_file import BatchRequest, LineError, read_batch_file
from prefixbatch.jobs.validate import tokenize
from prefixbatch.planning.plan import make_plan
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.tokenizer import Tokenizer

# Issue #25's handed case: chat histories with tool calls (content null and "") and results.
HANDED = Path(__file__).parent / "cases" / "23-tool-calls-in-history.jsonl"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcdefghi",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temp_c": 21}'},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        save_chat_tokenizer(path, family)
        out[family] = Tokenizer(path)
    plain = tmp_path_factory.mktemp("plain")  # a template without tools (as SmolLM2's)
    save_tokenizer(plain)
    out["plain"] = Tokenizer(plain)
    return out


def render(  # type: ignore[no-untyped-def]
    tok: Tokenizer, messages, tools=None, choice=None, params=None, prompt=True, **kwargs
):
    tool_request = parse_tools(tools, choice)
    request = ChatRequest(check_messages(messages), tool_request, kwargs, prompt)
    return ChatSetup(tok).render(request, params or SamplingParams())


@pytest.mark.parametrize("family", ["qwen3", "llama3_json", "mistral"])
def test_tools_and_a_tool_history_render_as_the_family_writes_them(tokenizers, family):  # type: ignore[no-untyped-def]
    tok = tokenizers[family]
    text = render(tok, HISTORY, [WEATHER_TOOL]).text
    assert "Current weather of a city." in text  # the tools block
    call = {
        "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
        '"id": "abcdefghi"}]',
    }[family]
    assert call in text  # arguments reach the template as an object, not JSON text
    result = {
        "qwen3": '<tool_response>\n{"temp_c": 21}\n</tool_response>',
        "llama3_json": 'ipython<|end_header_id|>\n\n{"temp_c": 21}',
        "mistral": '[TOOL_RESULTS] {"content": "{\\"temp_c\\": 21}", "call_id": "abcdefghi"}',
    }[family]
    assert result in text
    empty = [HISTORY[0], {**HISTORY[1], "content": ""}, HISTORY[2]]
    assert render(tok, empty, [WEATHER_TOOL]).text == text  # null and "" content alike


def test_a_template_without_tools_says_so(tokenizers):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="cannot render 'tools'"):
        render(tokenizers["plain"], HISTORY[:1], [WEATHER_TOOL])
    with pytest.raises(ValueError, match=r"cannot render the tool calls of messages\[1\]"):
        render(tokenizers["plain"], HISTORY)
    # tools on a template whose calls no parser reads: only tool_choice "none" renders
    setup = ChatSetup(tokenizers["qwen3"], ChatOptions(tool_call_parser="none"))
    request = ChatRequest(check_messages(HISTORY[:1]), parse_tools([WEATHER_TOOL]))
    with pytest.raises(ValueError, match="no tool-call parser"):
        setup.render(request, SamplingParams())
    assert setup.render(replace_tools(request, "none"), SamplingParams()).reply.tool_parser is None


def replace_tools(request: ChatRequest, choice: str) -> ChatRequest:
    return ChatRequest(request.messages, parse_tools([WEATHER_TOOL], choice))


def test_the_handed_history_case(tokenizers, tmp_path):  # type: ignore[no-untyped-def]
    """Issue #25's case: on a template without tool calls, the three lines whose history holds
    calls get an error saying so (not a wrong cause, not a silent drop); on a template with
    them, every line renders its calls and results."""
    items = list(read_batch_file(HANDED))
    assert all(isinstance(i, BatchRequest) for i in items)
    ok, errors = tokenize(tokenizers["plain"], items)  # type: ignore[arg-type]
    assert sorted(e.line for e in errors) == [1, 2, 4]
    assert all("cannot render the tool calls of messages[1]" in e.message for e in errors)
    assert sorted(r.line for r, _ in ok) == [3, 5]
    ok, errors = tokenize(tokenizers["qwen3"], items)  # type: ignore[arg-type]
    assert not errors and len(ok) == 5
    texts = {r.line: tokenizers["qwen3"].hf.decode(ids) for r, ids in ok}
    for line in (1, 2, 4):
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in texts[line]
        assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in texts[line]
    assert texts[1] == texts[2]
    # Mistral's template wants 9-character call ids: its own error, per line
    ok, errors = tokenize(tokenizers["mistral"], items)  # type: ignore[arg-type]
    assert [e.line for e in errors] == [1, 2, 4]
    assert all("length 9" in e.message for e in errors)


def test_thinking_follows_the_template_and_its_kwargs(tokenizers):  # type: ignore[no-untyped-def]
    question = [{"role": "user", "content": "2+2?"}]
    qwen = tokenizers["qwen3"]
    on = render(qwen, question)
    off = render(qwen, question, enable_thinking=False)
    assert on.text.endswith("<|im_start|>assistant\n") and not on.reply.thought_open
    assert off.text == on.text + "<think>\n\n</think>\n\n" and not off.reply.thought_open
    forced = render(tokenizers["deepseek_r1"], question)
    assert forced.text.endswith("<think>\n") and forced.reply.thought_open
    assert forced.reply.reasoning is not None and on.reply.reasoning is not None
    # a history's reasoning: Qwen3 keeps it after the last question, R1 drops it
    answer = {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}
    assert "Two and two." in render(qwen, [*question, answer], prompt=False).text
    later = [*question, answer, {"role": "user", "content": "3+3?"}]
    assert "Two and two." not in render(qwen, later).text
    r1 = [*question, {"role": "assistant", "content": "<think>Two and two.</think>4"}, later[2]]
    assert "Two and two." not in render(tokenizers["deepseek_r1"], r1).text


def test_forced_calls_get_a_grammar_and_parsers_keep_their_tokens(tokenizers):  # type: ignore[no-untyped-def]
    question = HISTORY[:1]
    for family in ("qwen3", "llama3_json", "mistral"):
        tok = tokenizers[family]
        auto = render(tok, question, [WEATHER_TOOL])
        assert auto.params.structured is None
        required = render(tok, question, [WEATHER_TOOL], "required")
        assert required.params.structured is not None
        assert required.params.structured.kind == "structural_tag"
        named = {"type": "function", "function": {"name": "get_weather"}}
        assert render(tok, question, [WEATHER_TOOL], named).params.structured is not None
        none = render(tok, question, [WEATHER_TOOL], "none")
        assert none.params.structured is None and none.reply.tool_parser is None
        # [TOOL_CALLS] is a special token of Mistral's: it must stay in the text
        assert auto.params.skip_special_tokens is (family != "mistral")
    schema = GrammarSpec.from_request({"type": "json_object"})
    with pytest.raises(ValueError, match="cannot be combined with tool calls"):
        render(
            tokenizers["qwen3"],
            question,
            [WEATHER_TOOL],
            "required",
            SamplingParams(structured=schema),
        )


@pytest.mark.parametrize("family", ["qwen3", "llama3_json", "mistral"])
def test_a_shared_tools_block_is_a_shared_prefix(tokenizers, tmp_path, family):  # type: ignore[no-untyped-def]
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": f"Tool number {i} of the shared block. " * 3,
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
        }
        for i in range(6)
    ]
    lines = [
        {
            "custom_id": f"q{i}",
            "body": {
                "messages": [
                    {"role": "system", "content": "You are an agent."},
                    {"role": "user", "content": f"Question {i}: what is {i} squared?"},
                ],
                "tools": tools,
                "tool_choice": "required",
            },
            "url": "/v1/chat/completions",
            "method": "POST",
        }
        for i in range(8)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = [i for i in read_batch_file(path) if not isinstance(i, LineError)]
    ok, errors = tokenize(tokenizers[family], items)
    assert not errors
    prompts = [ids for _, ids in ok]
    tok = tokenizers[family]
    last_tool = tok.hf.decode(prompts[0]).rindex("tool_5")
    tools_end = len(tok.encode_text(tok.hf.decode(prompts[0])[:last_tool]))
    plan = make_plan(prompts, [16] * len(prompts), 16)
    (level,) = plan.root.children  # one level above every request
    assert level.prefix_len >= tools_end - 16  # it covers the tools block (to a whole block)
