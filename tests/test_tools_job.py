"""Tools and reasoning end to end on tiny random models with each family's tokenizer and chat
template: batch files through ``prefixbatch run`` (forced calls parse and validate, every record
validates against OpenAI's chat completion schema), the Python API, the server's batch worker
and Ray workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from chat_formats import FAMILIES, TOOL_SCHEMAS, TOOLS, chat_model

from prefixbatch import LLM, SamplingParams
from prefixbatch.chat.reasoning import THINK
from prefixbatch.cli import main
from prefixbatch.config import EngineConfig
from prefixbatch.grammar_spec import GrammarSpec

TIME = {"type": "function", "function": {"name": "get_time"}}
OPENAI = json.loads((Path(__file__).parent / "data/openai_openapi_subset.json").read_text())
RESPONSE = {**OPENAI, "$ref": "#/components/schemas/CreateChatCompletionResponse"}
ENGINE = ["--device", "cpu", "--block-size", "8", "--kv-cache-memory", "16MiB", "--quiet"]


@pytest.fixture(scope="module")
def models(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-models")
    pairs = {
        "qwen3": "qwen3",
        "llama3_json": "llama3",
        "mistral": "mistral",
        "deepseek_r1": "qwen3",
    }
    return {f: chat_model(tiny_models[m], f, root / f) for f, m in pairs.items()}


def line(custom_id: str, question: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [
                {"role": "system", "content": "You call tools."},
                {"role": "user", "content": question},
            ],
            "max_tokens": 64,
            "temperature": 0,
            **body,
        },
    }


LINES = [
    line("required", "Weather and time in Rome?", tools=TOOLS, tool_choice="required"),
    line("named", "Time in Oslo?", tools=TOOLS, tool_choice=TIME),
    line(
        "single",
        "Weather in Lima?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    ),
    line("sampled", "Any tool.", tools=TOOLS, tool_choice="required", temperature=1, seed=3),
    line("auto", "Weather in Kyiv?", tools=TOOLS),
    line("none", "Weather in Baku?", tools=TOOLS, tool_choice="none"),
    line("plain", "Hello there."),
]


def records(path: Path) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def check_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message's calls, each checked against its function's schema."""
    calls = message.get("tool_calls", [])
    for call in calls:
        assert call["type"] == "function" and call["id"]
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, TOOL_SCHEMAS[call["function"]["name"]])
    return calls


@pytest.mark.parametrize("family", ["qwen3", "llama3_json", "mistral"])
def test_forced_calls_through_a_batch_file(models, tmp_path, family):  # type: ignore[no-untyped-def]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    out = tmp_path / "out.jsonl"
    assert main(["run", str(inp), "-o", str(out), "--model", str(models[family]), *ENGINE]) == 0
    recs = records(out)
    assert set(recs) == {x["custom_id"] for x in LINES} and all(
        r["error"] is None for r in recs.values()
    )
    for rec in recs.values():
        jsonschema.validate(rec["response"]["body"], RESPONSE)
    choice = {cid: r["response"]["body"]["choices"][0] for cid, r in recs.items()}
    for cid in ("required", "named", "single", "sampled"):
        calls = check_calls(choice[cid]["message"])
        if choice[cid]["finish_reason"] == "tool_calls":
            assert calls and choice[cid]["message"]["content"] is None
        else:  # cut by max_tokens after some complete calls
            assert choice[cid]["finish_reason"] == "length" and cid in ("required", "sampled")
    assert [c["function"]["name"] for c in check_calls(choice["named"]["message"])] == ["get_time"]
    assert len(check_calls(choice["single"]["message"])) == 1
    assert choice["named"]["finish_reason"] == choice["single"]["finish_reason"] == "tool_calls"
    check_calls(choice["auto"]["message"])  # whatever the model said, nothing breaks
    assert (
        "tool_calls" not in choice["none"]["message"]
        and "tool_calls" not in choice["plain"]["message"]
    )
    # the same job resumed answers nothing again
    assert main(["run", str(inp), "-o", str(out), "--model", str(models[family]), *ENGINE]) == 0
    assert records(out) == recs


def test_the_template_and_parsers_come_from_the_command_line(models, tmp_path):  # type: ignore[no-untyped-def]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(LINES[1]) + "\n")
    model = str(models["deepseek_r1"])  # its template reads no tools
    out = tmp_path / "out.jsonl"
    assert main(["run", str(inp), "-o", str(out), "--model", model, *ENGINE]) == 0
    assert "cannot render 'tools'" in records(out)["named"]["error"]["message"]
    template = tmp_path / "qwen3.jinja"
    template.write_text(FAMILIES["qwen3"].chat_template())
    args = ["--chat-template", str(template), "--reasoning-parser", "none", "--overwrite"]
    assert main(["run", str(inp), "-o", str(out), "--model", model, *ENGINE, *args]) == 0
    message = records(out)["named"]["response"]["body"]["choices"][0]["message"]
    assert [c["function"]["name"] for c in check_calls(message)] == ["get_time"]
    assert "reasoning_content" not in message
    # the forced calls take the named parser's syntax: Llama's JSON, read back as calls
    llama = [*args, "--tool-call-parser", "llama3_json"]
    assert main(["run", str(inp), "-o", str(out), "--model", model, *ENGINE, *llama]) == 0
    message = records(out)["named"]["response"]["body"]["choices"][0]["message"]
    assert [c["function"]["name"] for c in check_calls(message)] == ["get_time"]
    no_parser = [*args, "--tool-call-parser", "none"]
    assert main(["run", str(inp), "-o", str(out), "--model", model, *ENGINE, *no_parser]) == 0
    assert "no tool-call parser" in records(out)["named"]["error"]["message"]


def test_reasoning_split_on_a_forced_thought(models):  # type: ignore[no-untyped-def]
    """DeepSeek-R1's template opens the thought: what the model writes up to </think> is
    reasoning, the rest content; a thought cut by max_tokens is all reasoning."""
    llm = LLM(str(models["deepseek_r1"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    question = [{"role": "user", "content": "Think, then answer."}]
    # a random model closes its thought when a regex makes it
    regex = GrammarSpec.from_request(guided_regex=r"[a-z]{3,8}</think>\n\n[a-z]{3,8}")
    params = [
        SamplingParams(max_tokens=6, temperature=0),
        SamplingParams(max_tokens=40, temperature=0, structured=regex),
    ]
    cut, split = llm.chat([question, question], params)
    assert cut.finish_reason == "length" and len(cut.output_token_ids) == 6  # thinking counts
    assert THINK.end not in cut.text and cut.outputs[0].message.content is None
    assert cut.outputs[0].message.reasoning_content == cut.text.strip()
    reasoning, content = split.text.split("</think>")
    message = split.outputs[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content.strip())


def test_enable_thinking_false_leaves_the_answer_as_content(models):  # type: ignore[no-untyped-def]
    llm = LLM(str(models["qwen3"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    question = [{"role": "user", "content": "Answer."}]
    params = SamplingParams(max_tokens=8, temperature=0)
    off = llm.chat(question, params, chat_template_kwargs={"enable_thinking": False})[0]
    on = llm.chat(question, params)[0]
    assert len(off.prompt_token_ids) > len(on.prompt_token_ids)  # the empty thought
    assert off.outputs[0].message.reasoning_content is None
    assert off.outputs[0].message.content == (off.text or None)


def test_python_api_tools(models):  # type: ignore[no-untyped-def]
    llm = LLM(str(models["qwen3"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    chats = [[{"role": "user", "content": f"Weather {i}?"}] for i in range(3)]
    outs = llm.chat(
        chats, SamplingParams(max_tokens=64, temperature=0), tools=TOOLS, tool_choice=TIME
    )
    for out in outs:
        assert out.finish_reason == "tool_calls"
        (call,) = out.outputs[0].message.tool_calls
        assert call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS["get_time"])
    with pytest.raises(ValueError, match="conversation 0: the chat template cannot render 'tools'"):
        LLM._from_engine(llm.engine).chat(
            chats[0], tools=TOOLS, chat_template="{{ messages[0]['content'] }}"
        )
    with pytest.raises(ValueError, match="'tool_choice' names the function"):
        llm.chat(chats[0], tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})


def test_server_batches_carry_tools(models, tmp_path):  # type: ignore[no-untyped-def]
    """The server's batch worker renders and parses with its chat options; through the
    official client, in process."""
    import openai
    from fastapi.testclient import TestClient

    from prefixbatch.chat.render import ChatOptions
    from prefixbatch.engine import LLMEngine
    from prefixbatch.server.app import AppConfig, create_app
    from prefixbatch.server.storage import Store
    from prefixbatch.server.worker import BatchWorker, WorkerOptions

    engine = LLMEngine(
        EngineConfig(
            model=str(models["deepseek_r1"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20
        )
    )
    store = Store(tmp_path / "data")
    chat = ChatOptions(chat_template=FAMILIES["qwen3"].chat_template(), reasoning_parser="none")
    worker = BatchWorker(store, engine, WorkerOptions(chat=chat))
    inp = tmp_path / "in.jsonl"
    lines = [{**x, "body": {**x["body"], "max_tokens": 200}} for x in LINES[1:3]]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))  # a tokenizer of other text
    try:
        with TestClient(create_app(store, worker, AppConfig(engine.model_name))) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)
            file = client.files.create(file=inp.open("rb"), purpose="batch")
            batch = client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status not in ("completed", "failed"):
                batch = client.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.error_file_id is None
            text = client.files.content(batch.output_file_id).text
    finally:
        store.close()
    recs = records_of(text)
    for rec in recs.values():
        jsonschema.validate(rec["response"]["body"], RESPONSE)
        choice = rec["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(check_calls(choice["message"])) == 1


def records_of(text: str) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in map(json.loads, text.splitlines())}


def test_plan_and_serve_take_the_chat_options(models, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    import prefixbatch.server

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    template = tmp_path / "qwen3.jinja"
    template.write_text(FAMILIES["qwen3"].chat_template())
    model = ["--model", str(models["deepseek_r1"])]  # its own template reads no tools
    assert main(["plan", str(inp), *model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rejected_lines"] == 6
    assert main(["plan", str(inp), *model, "--json", "--chat-template", str(template)]) == 0
    assert json.loads(capsys.readouterr().out)["rejected_lines"] == 0
    seen = []
    monkeypatch.setattr(prefixbatch.server, "serve", lambda config, opts: seen.append(opts))
    args = ["--chat-template", str(template), "--tool-call-parser", "hermes"]
    assert main(["serve", *model, *args, "--reasoning-parser", "none"]) == 0
    (chat,) = (opts.chat for opts in seen)
    assert chat.chat_template == template.read_text()
    assert (chat.tool_call_parser, chat.reasoning_parser) == ("hermes", "none")
    with pytest.raises(SystemExit):
        main(["run", str(inp), "-o", str(tmp_path / "o"), "--chat-template", str(tmp_path / "no")])
    assert "is neither an existing file nor a Jinja template" in capsys.readouterr().err
