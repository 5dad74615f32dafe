"""The batch-file reader on tools, tool choice, template variables and tool-call histories:
what is accepted, what becomes a line error naming the field (and every other line still
reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefixbatch.io.batch_file import CHAT_URL, BatchRequest, LineError, read_batch_file

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def chat(**body: Any) -> str:
    body.setdefault("messages", [{"role": "user", "content": "Weather in Paris?"}])
    return json.dumps({"custom_id": "a", "method": "POST", "url": CHAT_URL, "body": body})


def read_one(tmp_path: Path, text: str) -> BatchRequest | LineError:
    path = tmp_path / "in.jsonl"
    ok = json.dumps({"custom_id": "z", "prompt": "x"})
    path.write_text(text + "\n" + ok + "\n")
    first, second = read_batch_file(path)
    assert isinstance(second, BatchRequest)  # a bad line never stops the next
    return first


def test_tools_and_choices_parse(tmp_path):  # type: ignore[no-untyped-def]
    req = read_one(tmp_path, chat(tools=[TOOL]))
    assert isinstance(req, BatchRequest) and req.tools is not None
    assert req.tools.choice == "auto" and req.tools.parallel and req.tools.parses_calls
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = read_one(tmp_path, chat(tools=[TOOL], tool_choice=named, parallel_tool_calls=False))
    assert isinstance(req, BatchRequest) and req.tools is not None
    assert (req.tools.choice, req.tools.function, req.tools.parallel) == (
        "function",
        "get_weather",
        False,
    )
    assert req.tools.forces_calls
    ((name, schema),) = req.tools.signatures()
    assert name == "get_weather" and json.loads(schema) == TOOL["function"]["parameters"]
    none = read_one(tmp_path, chat(tools=[TOOL], tool_choice="none"))
    assert isinstance(none, BatchRequest) and none.tools is not None
    assert not none.tools.parses_calls
    for nothing in (chat(tools=[]), chat(tool_choice="none"), chat(tool_choice="auto")):
        req = read_one(tmp_path, nothing)
        assert isinstance(req, BatchRequest) and req.tools is None
    kwargs = read_one(tmp_path, chat(chat_template_kwargs={"enable_thinking": False}))
    assert isinstance(kwargs, BatchRequest) and kwargs.template_kwargs == {"enable_thinking": False}
    # the resume hash covers the tools: other tools are another request
    a = read_one(tmp_path, chat(tools=[TOOL]))
    b = read_one(tmp_path, chat(tools=[TOOL], tool_choice="required"))
    assert a.request_hash != b.request_hash  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": {"a": 1}}, "'tools' must be a list"),
        ({"tools": [{"type": "custom", "custom": {}}]}, 'got type "custom"'),
        ({"tools": [{"type": "function"}]}, "tools[0].function must be an object"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name must be 1-64 letters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters must be a JSON schema object",
        ),
        ({"tools": [TOOL, TOOL]}, 'defines the function "get_weather" twice'),
        ({"tools": [TOOL], "tool_choice": "always"}, "'tool_choice' must be"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "'tool_choice' names the function \"x\", not in 'tools'",
        ),
        ({"tool_choice": "required"}, "the request has no 'tools'"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "'parallel_tool_calls' must be"),
        ({"chat_template_kwargs": [1]}, "'chat_template_kwargs' must be an object"),
        ({"chat_template_kwargs": {"tools": []}}, "'chat_template_kwargs' cannot set \"tools\""),
        ({"chat_template_kwargs": {"padding": True}}, 'cannot set "padding"'),
        ({"functions": [{"name": "f"}]}, "'functions' is not supported yet"),
        (
            {"messages": [{"role": "user", "content": None}]},
            "messages[0].content is null: only an assistant message with tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
            "messages[0].tool_calls must be a list, on an assistant message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments is not JSON",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "content": "21", "tool_call_id": 5},
                ]
            },
            "messages[1].tool_call_id must be a string, got 5",
        ),
    ],
)
def test_bad_tool_fields_are_line_errors(tmp_path, body, message):  # type: ignore[no-untyped-def]
    bad = read_one(tmp_path, chat(**body))
    assert isinstance(bad, LineError) and message in bad.message, bad
    assert bad.message.startswith("line 1:")


def test_histories_keep_the_tool_fields(tmp_path):  # type: ignore[no-untyped-def]
    messages = [
        {"role": "user", "content": "Weather in Paris?", "name": "ana"},
        {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "Hm."},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21"},
        {"role": "assistant", "content": "21 degrees.", "refusal": None, "audio": None},
    ]
    req = read_one(tmp_path, chat(messages=messages))
    assert isinstance(req, BatchRequest)
    decoded = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert req.messages == [
        messages[0],
        {"role": "assistant", "content": None, "tool_calls": [decoded], "reasoning_content": "Hm."},
        messages[2],
        {"role": "assistant", "content": "21 degrees."},  # other keys are not passed on
    ]
