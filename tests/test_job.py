"""Batch jobs end to end through the CLI: output format, per-line errors, whole-job errors,
resume after SIGKILL, tiny KV budgets, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefixbatch import LLM, SamplingParams
from prefixbatch.cli import main


def words(seed: int, n: int) -> str:
    return " ".join(f"w{3 + (seed * 31 + i * 7) % 500}" for i in range(n))


def write_jsonl(path: Path, objs: list) -> Path:  # type: ignore[type-arg]
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def chat_line(i: int, max_tokens: int = 6, **body) -> dict:  # type: ignore[no-untyped-def,type-arg]
    doc = words(i % 3, 30)  # three shared documents
    return {
        "custom_id": f"chat-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [
                {"role": "system", "content": doc},
                {"role": "user", "content": words(i, 4)},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def completion_line(i: int, max_tokens: int = 6) -> dict:  # type: ignore[type-arg]
    return {
        "custom_id": f"cmpl-{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": words(i, 12), "max_tokens": max_tokens, "temperature": 0},
    }


def records(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(args: list[str]) -> int:
    return main(["run", *args, "--quiet", "--block-size", "8", "--device", "cpu"])


def test_output_format_field_by_field(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    lines = [
        chat_line(0),
        completion_line(1),
        {"custom_id": "min-2", "prompt": words(2, 5), "max_tokens": 4, "temperature": 0},
        "{broken",
        chat_line(3) | {"url": "/v1/x"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run_cli([str(inp), "-o", str(out), "--model", model]) == 0
    recs = {r["custom_id"] or f"line{r['error']['line']}": r for r in records(out)}
    assert set(recs) == {"chat-0", "cmpl-1", "min-2", "line4", "chat-3"}
    chat = recs["chat-0"]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "llama"
    assert isinstance(body["created"], int) and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert 0 < usage["completion_tokens"] <= 6
    for cid in ("cmpl-1", "min-2"):
        body = recs[cid]["response"]["body"]
        assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    # the text equals what the Python API produces for the same prompt
    llm = LLM(model, device="cpu", block_size=8)
    ref = llm.generate(words(1, 12), SamplingParams(max_tokens=6, temperature=0))[0]
    assert recs["cmpl-1"]["response"]["body"]["choices"][0]["text"] == ref.text
    for key, line in (("line4", 4), ("chat-3", 5)):
        err = recs[key]
        assert err["response"] is None and err["error"]["line"] == line
        assert err["error"]["code"] == "invalid_request"
        assert err["error"]["message"].startswith(f"line {line}:")


def test_prompt_too_long_is_a_line_error(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [completion_line(0), {"custom_id": "long", "prompt": words(1, 300), "max_tokens": 4}],
    )
    out = tmp_path / "out.jsonl"
    assert (
        run_cli(
            [
                str(inp),
                "-o",
                str(out),
                "--model",
                str(tiny_models["llama"]),
                "--max-model-len",
                "128",
            ]
        )
        == 0
    )
    recs = {r["custom_id"]: r for r in records(out)}
    assert recs["cmpl-0"]["error"] is None
    assert "context is 128 tokens" in recs["long"]["error"]["message"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_input", "input file not found"),
        ("missing_model", "model path does not exist"),
        ("unsupported", "unsupported architecture"),
        ("kv_too_small", "holds no KV block"),
    ],
)
def test_whole_job_errors(tmp_path, tiny_models, capsys, case, message):  # type: ignore[no-untyped-def]
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(0, max_tokens=50)])
    model = str(tiny_models["llama"])
    args = [str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", model]
    if case == "missing_input":
        args[0] = str(tmp_path / "nope.jsonl")
    elif case == "missing_model":
        args[-1] = str(tmp_path / "no-model")
    elif case == "unsupported":
        bad = tmp_path / "gpt2"
        bad.mkdir()
        (bad / "config.json").write_text(
            json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
        )
        args[-1] = str(bad)
    else:
        args += ["--kv-cache-memory", "5KiB"]  # a block of 8 tokens takes 6144 bytes
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if case == "unsupported":
        assert "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err


def test_tiny_kv_budget_completes_through_preemption(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch.config import EngineConfig
    from prefixbatch.jobs.job import JobOptions, run_job

    lines = [completion_line(i, max_tokens=24) for i in range(12)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    cfg = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=18 * 3072
    )
    summary = run_job(cfg, JobOptions(inp, tmp_path / "small.jsonl", quiet=True))
    assert summary.preemptions > 0 and summary.requests_ok == 12
    assert summary.prefill_tokens_saved >= 0  # recomputed prefill never shows as negative
    big = run_job(
        EngineConfig(model=str(tiny_models["llama"]), device="cpu", block_size=8),
        JobOptions(inp, tmp_path / "big.jsonl", quiet=True),
    )
    assert big.preemptions == 0
    texts = {
        p: {
            r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
            for r in records(tmp_path / p)
        }
        for p in ("small.jsonl", "big.jsonl")
    }
    assert texts["small.jsonl"] == texts["big.jsonl"]
    assert any("preemptions: " in line and not line.endswith(" 0") for line in summary.lines())


def _strip_created(path: Path) -> list[dict]:  # type: ignore[type-arg]
    recs = records(path)
    for r in recs:
        if r["response"]:
            r["response"]["body"].pop("created")
    return recs


def test_same_input_same_output(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    lines = [chat_line(i, temperature=0.8) for i in range(6)] + [completion_line(7)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    model = str(tiny_models["qwen2"])
    for name in ("a.jsonl", "b.jsonl"):
        assert run_cli([str(inp), "-o", str(tmp_path / name), "--model", model]) == 0
    assert _strip_created(tmp_path / "a.jsonl") == _strip_created(tmp_path / "b.jsonl")


def test_sigkill_then_resume_answers_every_request_once(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    lines = [completion_line(i, max_tokens=60) for i in range(40)] + ["{bad line"]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    assert run_cli([str(inp), "-o", str(reference), "--model", model]) == 0
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "prefixbatch.cli",
        "run",
        str(inp),
        "-o",
        str(out),
        "--model",
        model,
        "--quiet",
        "--device",
        "cpu",
        "--block-size",
        "8",
        "--max-num-batched-tokens",
        "64",
        "--kv-cache-memory",
        "200KiB",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(records(out))
    assert 6 <= done_before < 41, "the kill must land mid-run"
    with open(out, "a") as f:
        f.write('{"id": "batch_req_partial", "custom_')  # a line cut short by the crash
    assert run_cli([str(inp), "-o", str(out), "--model", model, "--resume"]) == 0
    got = records(out)
    ids = [r["custom_id"] or f"line{r['error']['line']}" for r in got]
    assert len(ids) == len(set(ids)) == 41  # every request exactly once
    text = {
        r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in got if r["response"]
    }
    expected = {
        r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
        for r in records(reference)
        if r["response"]
    }
    assert text == expected


def test_progress_log_lines_when_not_a_terminal():
    import io

    from prefixbatch.io.progress import Progress

    stream = io.StringIO()  # not a tty: plain periodic lines, no bar
    progress = Progress(3, stream=stream, interval=0.0)
    progress.update(1, 10, "2 workers, lag 0")
    progress.update(2, 20)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[prefixbatch] 1/3 requests") and "lag 0" in lines[0]
    assert "3/3 requests" in lines[-1] and "tok/s" in lines[-1] and "eta 0s" in lines[-1]
    quiet = io.StringIO()
    Progress(3, quiet=True, stream=quiet).update(3, 5)
    assert quiet.getvalue() == ""
