"""What a second new-user trial found, each fixed by its kind: the same file and flags give
the same outcome whichever lines are already answered (a request the KV pool cannot hold is a
line error, never a job error, in run, plan, run_batch and the Python API), the context error
wins over the KV pool's, a chat template is a file or its text in every front end, memory-size
options say what they take, the job's messages say what they count, and the README names every
reasoning parser ``run --help`` offers. (The ETA: ``test_progress_eta.py``; the Responses
echo: ``test_responses.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_job import completion_line, records, words, write_jsonl
from test_new_user import interrupt_at

from prefixbatch import LLM, SamplingParams
from prefixbatch.chat.render import ChatOptions
from prefixbatch.cli import build_parser, main
from prefixbatch.config import EngineConfig
from prefixbatch.jobs.job import JobOptions, make_executor, run_batch
from prefixbatch.loading.limits import EngineLimits

# The tiny llama's KV block of 8 tokens takes 6144 bytes: 60KiB is a pool of 10 blocks.
SMALL_POOL = ["--device", "cpu", "--block-size", "8", "--kv-cache-memory", "60KiB"]


def too_big(i: int) -> dict:  # type: ignore[type-arg]
    """A request inside the context (1024) that the small pool cannot hold (27 blocks > 10)."""
    return {"custom_id": f"big-{i}", "prompt": words(i, 12), "max_tokens": 200}


@pytest.mark.parametrize("small", [1, 0])
def test_the_same_command_gives_the_same_outcome(tmp_path, tiny_models, capsys, small):  # type: ignore[no-untyped-def]
    lines = [too_big(0), too_big(1), *[completion_line(i) for i in range(small)]]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SMALL_POOL]
    for run in range(2):  # the second run finds every runnable line answered
        assert main(args) == 0, run
        err = capsys.readouterr().err
        assert "Traceback" not in err and "too small for even one" not in err
        recs = {r["custom_id"]: r for r in records(out)}
        for cid in ("big-0", "big-1"):
            assert recs[cid]["error"]["message"].endswith(
                "the request needs 27 KV blocks and the cache has 10; raise --kv-cache-memory"
            )
        if small:
            assert recs["cmpl-0"]["error"] is None
        done = f"{small * (1 - run)} ok, 2 failed, {small * run} already answered"
        assert done in err, err


def test_the_server_and_the_python_api_agree(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    """The server (and each Ray worker) runs a batch through ``run_batch`` on a loaded
    executor: a batch whose every line is too big completes with their errors; the Python
    API rejects such a prompt with the same reason."""
    config = EngineConfig(
        model=str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=60 * 2**10
    )
    engine = make_executor(config)
    inp = write_jsonl(tmp_path / "in.jsonl", [too_big(0), too_big(1)])
    summary = run_batch(lambda: engine, JobOptions(inp, tmp_path / "out.jsonl", quiet=True))
    assert (summary.requests_ok, summary.requests_failed) == (0, 2)
    reason = "the request needs 27 KV blocks and the cache has 10; raise --kv-cache-memory"
    assert all(m.endswith(reason) for m in summary.failures)
    llm = LLM(config.model, device="cpu", block_size=8, kv_cache_memory=60 * 2**10)
    with pytest.raises(ValueError, match=f"prompt 0: {reason}"):
        llm.generate([list(range(5, 17))], SamplingParams(max_tokens=200))


def test_a_pool_that_holds_no_block_is_a_job_error(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(0)])
    args = ["run", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_models["llama"])]
    assert main([*args, "--device", "cpu", "--block-size", "8", "--kv-cache-memory", "6KiB"]) == 0
    assert main([*args, "--device", "cpu", "--block-size", "8", "--kv-cache-memory", "5KiB"]) == 2
    assert "holds no KV block (6144 bytes each)" in capsys.readouterr().err


def test_the_context_error_wins_over_the_kv_pools(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    limits = EngineLimits(max_model_len=1024, num_blocks=10, block_size=8, vocab_size=512)
    prompt = np.full(12, 5, np.int32)
    for max_tokens in (1013, 5000):
        assert "is too large" in str(limits.check(prompt, max_tokens, explicit=True))
        assert "raise --kv-cache-memory" in str(limits.check(prompt, max_tokens))  # a default
    assert "raise --kv-cache-memory" in str(limits.check(prompt, 1012, explicit=True))
    lines = [{"custom_id": "huge", "prompt": words(1, 12), "max_tokens": 100000}, too_big(2)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    model = ["--model", str(tiny_models["llama"])]
    assert main(["run", str(inp), "-o", str(out), *model, *SMALL_POOL, "--quiet"]) == 0
    message = {r["custom_id"]: r["error"]["message"] for r in records(out)}
    assert "'max_tokens' or 'max_completion_tokens' is too large: 100000" in message["huge"]
    assert "raise --kv-cache-memory" not in message["huge"]
    assert message["big-2"].endswith("raise --kv-cache-memory")
    assert main(["plan", str(inp), *model, "--kv-cache-memory", "60KiB", "--block-size", "8",
                 "--json"]) == 0  # fmt: skip
    rejected = json.loads(capsys.readouterr().out)["rejected"]
    assert [r["message"] for r in rejected] == [message["huge"], message["big-2"]]


def test_a_chat_template_is_a_file_or_its_text(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    text = "{% for m in messages %}w7 {{ m['content'] }} {% endfor %}w5"
    path = tmp_path / "t.jinja"
    path.write_text(text)
    shipped = Path(__file__).parents[1] / "examples/chat_templates/chatml_tools.jinja"
    assert ChatOptions(str(shipped)).chat_template == shipped.read_text()
    assert ChatOptions(str(path)).chat_template == ChatOptions(text).chat_template == text
    for bad in ("examples/chat_templates/no_such.jinja", "chatml"):
        with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
            ChatOptions(bad)
    llm = LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=2**20)
    chat = [{"role": "user", "content": "w9 w10"}]
    params = SamplingParams(max_tokens=2, temperature=0)
    for template in (str(path), text):
        (out,) = llm.chat(chat, params, chat_template=template, use_tqdm=False)
        assert out.prompt_token_ids == [7, 9, 10, 5]
    with pytest.raises(ValueError, match="'chatml' is neither an existing file"):
        llm.chat(chat, params, chat_template="chatml")
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(0)])
    args = ["run", str(inp), "-o", str(tmp_path / "o.jsonl"), "--chat-template", "chatml"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "argument --chat-template: chat template 'chatml' is neither" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["run", "in.jsonl", "-o", "o.jsonl", "--kv-cache-memory"],
        ["plan", "in.jsonl", "--kv-cache-memory"],
        ["serve", "--kv-cache-memory"],
        ["serve", "--max-upload-size"],
    ],
)
def test_a_memory_size_option_says_what_it_takes(capsys, args):  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as stop:
        main([*args, "lots"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-1]}: 'lots' is not a memory size" in err
    assert "512MiB, 2GiB" in err and "number of bytes" in err
    with pytest.raises(ValueError, match="'lots' is not a memory size"):
        LLM("no-model-needed", kv_cache_memory="lots")


def test_the_messages_say_what_they_count(tmp_path, tiny_models, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    good = [completion_line(i, max_tokens=1 + i) for i in range(10)]  # finishing step by step
    rejected = ["{broken", {"custom_id": "oov", "prompt": [5, 9999]}, too_big(0)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", [*rejected, *good]), tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *SMALL_POOL]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "planning the 12 requests read" in err  # the line that is no JSON is no request
    assert "12 requests read, 2 rejected by the checks against the model, 10 to run" in err
    assert "[prefixbatch] 10/10 requests" in err
    interrupt_at(monkeypatch, 12)
    assert main([*args, "--overwrite", "--quiet"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    answered = sum(r["error"] is None for r in records(out))
    assert 0 < answered < 10
    assert last.startswith(
        f"prefixbatch: interrupted: {answered} of 10 runnable requests answered, 3 lines failed; "
    )


def test_the_readme_names_every_parser_run_help_offers():  # type: ignore[no-untyped-def]
    import argparse

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    reasoning = readme[readme.index("- **Reasoning.**") :].split("\n- **")[0]
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (option,) = [a for a in sub.choices["run"]._actions if "--reasoning-parser" in a.option_strings]
    for name in option.choices:
        assert f"`{name}`" in reasoning, name
    calls = readme[readme.index("- **Guaranteed calls.**") :].split("\n- **")[0]
    assert "repeat its call until `max_tokens`" in calls
    assert "`parallel_tool_calls: false` allows exactly one call" in calls
