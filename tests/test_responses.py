"""``/v1/responses`` lines: the request mapped onto the chat path (checked without a model), the
Response object validated against OpenAI's published schema (``data/openai_response_subset.json``,
its source noted inside), and end to end on a tiny model with Qwen3's template: greedy text
equal to the same request sent as chat, tool calls as ``function_call`` items, reasoning items,
``max_output_tokens`` as an incomplete response, resume, the server and its endpoint check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from chat_formats import TOOL_SCHEMAS, TOOLS, chat_model

from prefixbatch.chat.reasoning import THINK
from prefixbatch.chat.render import ReplyFormat
from prefixbatch.chat.tool_parsers import TOOL_CALL_PARSERS
from prefixbatch.cli import main
from prefixbatch.io.batch_file import RESPONSES_URL, BatchRequest, LineError, parse_line
from prefixbatch.io.results import success_record
from prefixbatch.outputs import CompletionOutput, RequestOutput

SUBSET = json.loads((Path(__file__).parent / "data/openai_response_subset.json").read_text())
RESPONSE = {**SUBSET, "$ref": "#/components/schemas/Response"}
ENGINE = ["--device", "cpu", "--block-size", "8", "--kv-cache-memory", "16MiB", "--quiet"]
FUNCTIONS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses shape


def responses_line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES_URL, "body": body}


def parse(body: dict[str, Any]) -> BatchRequest | LineError:
    return parse_line(json.dumps(responses_line("a", **body)), 1, set())


def test_a_request_maps_onto_the_chat_fields() -> None:
    req = parse(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": [
                    {"type": "reasoning_text", "text": "look it up"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather",
                 "arguments": '{"city": "Rome", "unit": "C"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "21"},
                {"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": "Answer."}]},
            ],
            "max_output_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
            "tools": FUNCTIONS,
            "tool_choice": {"type": "function", "name": "get_time"},
            "reasoning": {"effort": "none"},
            "metadata": {"k": "v"},
            "user": "u1",
        }
    )  # fmt: skip
    assert isinstance(req, BatchRequest) and req.is_chat
    assert [m["role"] for m in req.messages or []] == [
        "system",
        "user",
        "assistant",
        "tool",
        "system",
    ]
    assistant = (req.messages or [])[2]
    assert assistant["reasoning_content"] == "look it up" and assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Rome", "unit": "C"}
    assert (req.params.max_tokens, req.params.temperature, req.params.top_p) == (7, 0, 0.5)
    assert req.max_tokens_given and req.params.structured is not None
    assert req.tools is not None and (req.tools.choice, req.tools.function) == (
        "function",
        "get_time",
    )
    assert req.template_kwargs["enable_thinking"] is False
    echo = req.response_echo.fields() if req.response_echo else {}
    assert echo["metadata"] == {"k": "v"} and echo["user"] == "u1"
    assert [t["name"] for t in echo["tools"]] == ["get_weather", "get_time"]
    plain = parse({"input": "Hi", "reasoning": {"effort": "high"}})
    assert isinstance(plain, BatchRequest) and plain.messages == [{"role": "user", "content": "Hi"}]
    assert plain.template_kwargs == {"enable_thinking": True, "reasoning_effort": "high"}
    assert (
        plain.request_hash == parse({"input": "Hi", "reasoning": {"effort": "high"}}).request_hash
    )
    chat = parse_line(
        json.dumps(
            {"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": plain.messages}}
        ),
        1,
        set(),
    )
    assert isinstance(chat, BatchRequest) and chat.request_hash != plain.request_hash


@pytest.mark.parametrize(
    "body, named",
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "'previous_response_id'"),
        ({"input": "x", "background": True}, "'background'"),
        ({"input": "x", "stream": True}, "'stream'"),
        ({"input": "x", "store": True}, "'store'"),
        ({"input": "x", "conversation": "conv_1"}, "'conversation'"),
        ({"input": "x", "include": ["reasoning.encrypted_content"]}, "'include'"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 'tools[0].type "web_search"'),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "'tool_choice'"),
        ({"input": [{"type": "item_reference", "id": "i"}]}, 'input[0].type "item_reference"'),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            'input[0].content[0].type "input_image"',
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": []}, "'input'"),
        ({"instructions": "only"}, "'input'"),
        ({"input": "x", "max_tokens": 5}, "use 'max_output_tokens'"),
        ({"input": "x", "response_format": {"type": "json_object"}}, "use 'text.format'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "use 'input'"),
        ({"input": "x", "max_output_tokens": 0}, "'max_output_tokens'"),
        ({"input": "x", "reasoning": {"summary": "auto"}}, "'reasoning.summary'"),
        ({"input": "x", "reasoning": {"effort": "huge"}}, "'reasoning.effort'"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "'text.format.type'"),
        ({"input": "x", "metadata": {"k": 1}}, "'metadata'"),
        ({"input": "x", "n": 2}, "unknown field 'n'"),
        ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
            "text.format.schema",
        ),
    ],
)
def test_unsupported_fields_are_line_errors_naming_them(body: dict[str, Any], named: str) -> None:
    err = parse(body)
    assert isinstance(err, LineError) and named in err.message, err


CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{bad"}
CHAT_NAMES = ("messages", "response_format", "function.", "max_tokens", "max_completion_tokens")


@pytest.mark.parametrize(
    "body, named",
    [
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "s",
                                               "schema": {"type": "objectx"}}}},
            "'text.format': cannot compile json_schema",
        ),
        ({"input": "x", "text": {"format": {"type": "json_object"}}, "guided_regex": "a"},
         "use only one of 'text.format', guided_choice, guided_regex"),
        ({"input": "x", "tool_choice": "sometimes"}, '{"type": "function", "name": ...}'),
        ({"input": "x", "tools": [{"type": "function", "name": "f", "description": 5}]},
         "tools[0].description must be a string"),
        ({"instructions": "s", "input": [{"role": "user", "content": "q"}, CALL]},
         "input[1].arguments is not JSON"),
    ],
)  # fmt: skip
def test_chat_path_errors_name_the_responses_fields(body: dict[str, Any], named: str) -> None:
    """The chat path's own checks run on the mapped body; their messages name what the
    Responses request wrote, never the chat field it was mapped to."""
    err = parse(body)
    assert isinstance(err, LineError) and named in err.message, err
    assert not any(name in err.message for name in CHAT_NAMES), err.message


def test_errors_found_with_the_model_name_the_responses_fields(tiny_models, tmp_path):  # type: ignore[no-untyped-def]
    """Errors found after parsing (the template rendering a history, the context) too."""
    call = {**CALL, "arguments": "{}"}
    history = [{"role": "user", "content": "w5"}, call, {"type": "function_call_output",
               "call_id": "c1", "output": "w6"}]  # fmt: skip
    lines = [
        responses_line("calls", instructions="w7", input=history),
        responses_line("budget", input="w5 w6", max_output_tokens=40),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    model = str(tiny_models["llama"])  # its template never reads tool_calls
    assert (
        main(["run", str(inp), "-o", str(out), "--model", model, *ENGINE, "--max-model-len", "32"])
        == 0
    )
    recs = records(out.read_text())
    calls, budget = recs["calls"]["error"]["message"], recs["budget"]["error"]["message"]
    assert "cannot render the tool calls of input[1]" in calls
    assert "'max_output_tokens' is too large: 40" in budget and "lower max_output_tokens" in budget
    assert not any(n in calls + budget for n in CHAT_NAMES), (calls, budget)


def _answered(req: BatchRequest, text: str, finish: str, reply: ReplyFormat) -> dict[str, Any]:
    from dataclasses import replace

    req = replace(req, reply=reply)
    ids = list(range(len(text)))  # one token a character
    out = RequestOutput(0, [5, 6, 7], [CompletionOutput(0, ids, text, finish)])
    decode = lambda ids: text[: len(ids)]  # noqa: E731
    body = success_record(req, out, "tiny", decode=decode)["response"]["body"]
    jsonschema.validate(body, RESPONSE)
    return body


def test_the_response_object_follows_openai_schema() -> None:
    req = parse({"input": "Weather?", "tools": FUNCTIONS, "metadata": {"k": "v"}})
    assert isinstance(req, BatchRequest)
    hermes = TOOL_CALL_PARSERS["hermes"]
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": 3}}\n</tool_call>'
    body = _answered(req, f"mull</think>Sure.{call}", "stop", ReplyFormat(hermes, THINK, True))
    assert [i["type"] for i in body["output"]] == ["reasoning", "message", "function_call"]
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert body["output"][0]["content"][0]["text"] == "mull"
    assert body["output"][1]["content"][0] == {
        "type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []
    }  # fmt: skip
    fc = body["output"][2]
    assert (fc["name"], json.loads(fc["arguments"])) == ("get_time", {"zone": 3})
    assert fc["call_id"].startswith("call_") and body["metadata"] == {"k": "v"}
    text = f"mull</think>Sure.{call}"
    assert body["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": len(text),
        "output_tokens_details": {"reasoning_tokens": len("mull</think>")},
        "total_tokens": 3 + len(text),
    }
    cut = _answered(req, "still thinking", "length", ReplyFormat(hermes, THINK, True))
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [i["type"] for i in cut["output"]] == ["reasoning"]
    assert cut["usage"]["output_tokens_details"]["reasoning_tokens"] == len("still thinking")
    empty = _answered(req, "", "stop", ReplyFormat())
    assert [i["type"] for i in empty["output"]] == ["message"]


def test_the_echoed_settings_default_as_openais_response_does() -> None:
    """A line that sets no tools echoes OpenAI's defaults, as the schema's example shows them
    (``tool_choice`` is ``"auto"`` with or without tools)."""
    example = SUBSET["components"]["schemas"]["Response"]["example"]
    req = parse({"input": "Hi"})
    assert isinstance(req, BatchRequest)
    body = _answered(req, "Hello.", "stop", ReplyFormat())
    jsonschema.validate(body, RESPONSE)
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        assert body[key] == example[key], key
    with_tools = parse({"input": "Hi", "tools": FUNCTIONS, "tool_choice": "none"})
    assert isinstance(with_tools, BatchRequest)
    assert _answered(with_tools, "Hello.", "stop", ReplyFormat())["tool_choice"] == "none"


@pytest.fixture(scope="module")
def qwen3(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model(tiny_models["qwen3"], "qwen3", tmp_path_factory.mktemp("resp") / "qwen3")


QUESTION = [
    {"role": "system", "content": "You call tools."},
    {"role": "user", "content": "Weather in Rome?"},
]


def pair(cid: str, responses: dict[str, Any], chat: dict[str, Any]) -> list[dict[str, Any]]:
    """The same request as a responses line and as a chat line."""
    return [
        responses_line(cid, **responses),
        {"custom_id": f"{cid}-chat", "url": "/v1/chat/completions", "body": chat},
    ]


THINKING = r"<think>\n[a-z]{3,8}\n</think>\n\n[a-z]{3,8}"
ZONE = {"name": "zone", "schema": TOOL_SCHEMAS["get_time"]}
LINES = [
    *pair(
        "plain",
        {"instructions": QUESTION[0]["content"], "input": QUESTION[1]["content"],
         "max_output_tokens": 12, "temperature": 0, "reasoning": {"effort": "none"}},
        {"messages": QUESTION, "max_completion_tokens": 12, "temperature": 0,
         "chat_template_kwargs": {"enable_thinking": False}},
    ),
    *pair(
        "items",
        {"input": [{"type": "message", "role": m["role"], "content": [
            {"type": "input_text", "text": m["content"]}]} for m in QUESTION],
         "max_output_tokens": 64, "temperature": 0},
        {"messages": QUESTION, "max_tokens": 64, "temperature": 0},
    ),
    *pair(
        "tools",
        {"input": QUESTION[1]["content"], "tools": FUNCTIONS, "tool_choice": "required",
         "max_output_tokens": 64, "temperature": 0},
        {"messages": QUESTION[1:], "tools": TOOLS, "tool_choice": "required", "max_tokens": 64,
         "temperature": 0},
    ),
    *pair(
        "json",
        {"input": "JSON please", "max_output_tokens": 40, "temperature": 0,
         "text": {"format": {"type": "json_schema", **ZONE}}},
        {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 40,
         "temperature": 0, "response_format": {"type": "json_schema", "json_schema": ZONE}},
    ),
    *pair(  # a random model thinks when a regex makes it
        "thought",
        {"input": "Think.", "max_output_tokens": 40, "temperature": 0, "guided_regex": THINKING},
        {"messages": [{"role": "user", "content": "Think."}], "max_tokens": 40,
         "temperature": 0, "guided_regex": THINKING},
    ),
    responses_line("bad", input="x", previous_response_id="resp_1"),
]  # fmt: skip


def records(text: str) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in map(json.loads, text.splitlines())}


def check_against_chat(recs: dict[str, dict[str, Any]]) -> None:
    """Every responses record validates and says what its chat twin says."""
    for cid in ("plain", "items", "tools", "json", "thought"):
        body = recs[cid]["response"]["body"]
        jsonschema.validate(body, RESPONSE)
        chat = recs[f"{cid}-chat"]["response"]["body"]
        message, finish = chat["choices"][0]["message"], chat["choices"][0]["finish_reason"]
        items = {i["type"]: i for i in body["output"]}
        text = items["message"]["content"][0]["text"] if "message" in items else None
        assert text == message["content"], cid
        thought = items["reasoning"]["content"][0]["text"] if "reasoning" in items else None
        assert thought == message.get("reasoning_content"), cid
        calls = [
            (i["name"], i["arguments"]) for i in body["output"] if i["type"] == "function_call"
        ]
        chat_calls = [(c["function"]["name"], c["function"]["arguments"])
                      for c in message.get("tool_calls", [])]  # fmt: skip
        assert calls == chat_calls, cid
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])
        assert body["status"] == ("incomplete" if finish == "length" else "completed"), cid
        assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"], cid
        assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"], cid
    assert recs["tools"]["response"]["body"]["output"][-1]["type"] == "function_call"
    assert recs["plain"]["response"]["body"]["incomplete_details"] == {
        "reason": "max_output_tokens"
    }
    assert "'previous_response_id'" in recs["bad"]["error"]["message"]


@pytest.fixture(scope="module")
def batch_run(qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """``prefixbatch run`` over ``LINES``: its arguments and output file."""
    tmp = tmp_path_factory.mktemp("run")
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    out = tmp / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", str(qwen3), *ENGINE]
    assert main(args) == 0
    return args, out


def test_a_batch_file_answers_as_chat_does_and_resumes(
    batch_run: tuple[list[str], Path], tmp_path: Path
) -> None:
    args, out = batch_run
    recs = records(out.read_text())
    check_against_chat(recs)
    thought = recs["thought"]["response"]["body"]
    assert [i["type"] for i in thought["output"]] == ["reasoning", "message"]
    # <think>, a few letters, </think>: fewer tokens than the whole answer
    assert 3 <= thought["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert (
        thought["usage"]["output_tokens_details"]["reasoning_tokens"]
        < thought["usage"]["output_tokens"]
    )
    # every request answered: a rerun needs no model (each request hash matches)
    assert main([*args[:4], "--model", str(tmp_path / "no-model"), *ENGINE]) == 0
    assert records(out.read_text()) == recs
    # a run stopped after three records answers the others alone, in input order
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    assert main(args) == 0
    again = records(out.read_text())
    assert (
        list(again) == list(recs) and [again[c] for c in list(recs)[:3]] == list(recs.values())[:3]
    )
    assert all(stable(again[c]) == stable(recs[c]) for c in recs)


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on the run rather than on the request: its timestamps and
    its cached input tokens (the prompt tokens that run found computed before, which depends
    on what else it ran)."""
    body = (record["response"] or {}).get("body", {})
    body = {k: v for k, v in body.items() if "created" not in k and k != "completed_at"}
    usage = dict(body.get("usage") or {})
    for key in ("input_tokens_details", "prompt_tokens_details"):  # Responses', chat's
        if key in usage:
            usage[key] = {**usage[key], "cached_tokens": None}
    body["usage"] = usage
    return {**record, "body": body, "response": None}


def test_the_server_takes_responses_batches(
    qwen3: Path, batch_run: tuple[list[str], Path], tmp_path: Path
) -> None:
    import openai
    from fastapi.testclient import TestClient

    from prefixbatch.config import EngineConfig
    from prefixbatch.engine import LLMEngine
    from prefixbatch.server.app import AppConfig, create_app
    from prefixbatch.server.storage import Store
    from prefixbatch.server.worker import BatchWorker, WorkerOptions

    engine = LLMEngine(
        EngineConfig(model=str(qwen3), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    )
    store = Store(tmp_path / "data")
    worker = BatchWorker(store, engine, WorkerOptions())
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES if "-chat" not in x["custom_id"]))
    try:
        with TestClient(create_app(store, worker, AppConfig(engine.model_name))) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)
            file = client.files.create(file=inp.open("rb"), purpose="batch")
            with pytest.raises(openai.BadRequestError, match="/v1/responses"):
                client.batches.create(
                    input_file_id=file.id,
                    endpoint="/v1/embeddingz",
                    completion_window="24h",  # type: ignore[arg-type]
                )
            batch = client.batches.create(
                input_file_id=file.id, endpoint=RESPONSES_URL, completion_window="24h"
            )
            while batch.status not in ("completed", "failed"):
                batch = client.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.error_file_id is not None
            recs = records(client.files.content(batch.output_file_id).text)
            errors = records(client.files.content(batch.error_file_id).text)
    finally:
        store.close()
    assert set(recs) == {"plain", "items", "tools", "json", "thought"} and set(errors) == {"bad"}
    cli = records(batch_run[1].read_text())
    for cid, rec in recs.items():
        jsonschema.validate(rec["response"]["body"], RESPONSE)
        assert stable(rec) == stable(cli[cid])
    assert batch.usage is not None
    assert batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["input_tokens"] for r in recs.values()
    )


def test_the_compact_store_keeps_each_setting_once() -> None:
    """What a Response repeats of its request is held as bytes: the settings (tools,
    instructions) once per distinct value, the per-line metadata in one byte array."""
    import numpy as np

    from prefixbatch.io.results import record_key
    from prefixbatch.jobs.batch_store import BatchStore

    store = BatchStore()
    for i in range(300):
        req = parse({"input": f"q{i}", "instructions": "Be brief.", "tools": FUNCTIONS,
                     "metadata": {"row": str(i)}})  # fmt: skip
        assert isinstance(req, BatchRequest)
        store.add(req, record_key(req.custom_id, req.request_hash), np.arange(3, dtype=np.int32))
    store.freeze()
    assert len(store.settings) == 1
    for i in (0, 137, 299):
        info = store.info(i)
        assert info.url == RESPONSES_URL and info.response_echo is not None
        fields = info.response_echo.fields()
        assert fields["metadata"] == {"row": str(i)} and fields["instructions"] == "Be brief."
