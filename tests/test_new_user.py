"""What a new user tripped on, each fixed: the resume hint after an interrupted ``--overwrite``
run, rejected lines named by ``plan`` and the run summary, the Python API's log and progress,
``max_tokens`` beyond the context, JSON values in error messages, ``serve --help`` about
``--host``, and ``GrammarSpec`` importable from the package."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_job import completion_line, records, words, write_jsonl

import prefixbatch
from prefixbatch import LLM, GrammarSpec, SamplingParams
from prefixbatch.cli import build_parser, main
from prefixbatch.engine import LLMEngine
from prefixbatch.io.batch_file import parse_line

ENGINE = ["--device", "cpu", "--block-size", "8", "--kv-cache-memory", "16MiB"]


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, n: int) -> object:
    """Make the ``n``-th engine step raise KeyboardInterrupt (Ctrl-C mid-run); the original
    ``LLMEngine.step``, to put back."""
    step, calls = LLMEngine.step, {"n": 0}

    def interrupted_step(self: LLMEngine) -> list:  # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", interrupted_step)
    return step


def test_an_interrupted_overwrite_names_the_command_that_resumes(  # type: ignore[no-untyped-def]
    tmp_path, tiny_models, capsys, monkeypatch
):
    lines = [completion_line(i, max_tokens=1 + i) for i in range(8)]  # finishing step by step
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *ENGINE]
    assert main([*args, "--quiet"]) == 0
    step = interrupt_at(monkeypatch, 5)
    capsys.readouterr()
    assert main([*args, "--overwrite", "--quiet"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    hint = re.fullmatch(
        r"prefixbatch: interrupted: (\d+) of 8 runnable requests answered; "
        r"to resume, run it again without --overwrite: (prefixbatch run .*)",
        last,
    )
    assert hint is not None, last
    answered = int(hint.group(1))
    assert 0 < answered < 8 and sum(r["error"] is None for r in records(out)) == answered
    command = shlex.split(hint.group(2))
    assert "--overwrite" not in command and command[1:] == [*args, "--quiet"]
    monkeypatch.setattr(LLMEngine, "step", step)
    assert main([a for a in command[1:] if a != "--quiet"]) == 0
    summary = capsys.readouterr().err
    assert f"{8 - answered} ok, 0 failed, {answered} already answered" in summary


def bad_lines(n: int) -> list[object]:
    return [
        "{broken" if i % 2 else {"custom_id": f"oov-{i}", "prompt": [5, 9999]} for i in range(n)
    ]


def test_plan_and_the_run_summary_name_rejected_lines(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(0), *bad_lines(13)])
    model = ["--model", str(tiny_models["llama"])]
    assert main(["plan", str(inp), *model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rejected_lines"] == 13
    assert [r["line"] for r in report["rejected"]] == list(range(2, 15))
    assert report["rejected"][0]["message"].startswith("line 2: token id 9999 is outside")
    assert report["rejected"][1]["message"].startswith("line 3: invalid JSON")
    assert main(["plan", str(inp), *model]) == 0
    text = capsys.readouterr().out.splitlines()
    named = [x for x in text if x.startswith("rejected: line ")]
    assert len(named) == 10 and named[0].startswith("rejected: line 2: token id 9999")
    assert "rejected: ... and 3 more (each has an error record)" in text

    assert main(["run", str(inp), "-o", str(tmp_path / "out.jsonl"), *model, *ENGINE]) == 0
    err = capsys.readouterr().err.splitlines()
    failed = [x for x in err if x.startswith("[prefixbatch] failed: line ")]
    assert "[prefixbatch] requests: 1 ok, 13 failed, 0 already answered" in err
    assert len(failed) == 10 and failed[1].startswith("[prefixbatch] failed: line 3: invalid JSON")
    assert "[prefixbatch] failed: ... and 3 more (each has an error record)" in err


def test_the_python_api_logs_to_stderr_by_default(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    script = (
        "from prefixbatch import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_models['llama'])!r}, device='cpu', kv_cache_memory='16MiB')\n"
        "print(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].finish_reason)\n"
    )
    src = str(Path(prefixbatch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("stop", "length")
    assert "[prefixbatch] loading the model" in done.stderr
    assert "[prefixbatch] model loaded after" in done.stderr


def test_generate_shows_progress_unless_told_not_to(llm, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    from prefixbatch import llm as llm_module

    monkeypatch.setattr(llm_module, "PROGRESS_AFTER_S", 0.0)  # as if the call were long
    prompts = [[5, 6, 7 + i] for i in range(4)]
    llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert "[prefixbatch] 4/4 requests" in capsys.readouterr().err
    llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert "requests" not in capsys.readouterr().err


def test_max_tokens_beyond_the_context(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    prompt = words(1, 12)
    lines = [
        {"custom_id": "too-long", "prompt": prompt, "max_tokens": 100},
        {"custom_id": "too-long-2", "prompt": prompt, "max_completion_tokens": 60},
        {"custom_id": "default", "prompt": prompt, "ignore_eos": True},  # 100 by default
        {"custom_id": "fits", "prompt": prompt, "max_tokens": 10},
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "--model", str(tiny_models["llama"]), *ENGINE]
    assert main([*args, "--quiet", "--max-model-len", "64", "--default-max-tokens", "100"]) == 0
    recs = {r["custom_id"]: r for r in records(out)}
    assert recs["too-long"]["error"]["message"] == (
        "line 1: 'max_tokens' or 'max_completion_tokens' is too large: 100. This model's context "
        "is 64 tokens and the prompt has 12 (100 > 64 - 12); lower max_tokens"
    )
    assert "is too large: 60" in recs["too-long-2"]["error"]["message"]
    capped = recs["default"]["response"]["body"]  # a default max_tokens stops at the context
    assert capped["usage"]["total_tokens"] == 64
    assert capped["choices"][0]["finish_reason"] == "length"
    assert recs["fits"]["error"] is None
    # The Python API cuts at the context, as vLLM's LLM does.
    short = LLM(str(tiny_models["llama"]), device="cpu", max_model_len=64, kv_cache_memory=2**20)
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    (out_api,) = short.generate([list(range(5, 17))], params)
    assert out_api.finish_reason == "length" and len(out_api.output_token_ids) == 64 - 12


def test_error_messages_show_json_values():  # type: ignore[no-untyped-def]
    base = {"custom_id": "a", "prompt": "w5"}
    cases = [
        ({"custom_id": True, "prompt": "w5"}, "got true"),
        ({"custom_id": None, "prompt": "w5"}, "got null"),
        ({**base, "ignore_eos": "yes"}, 'got "yes"'),
        ({**base, "temperature": True}, "got true"),
        ({**base, "max_tokens": None, "seed": False}, "got false"),
        ({**base, "stream": True}, "(got true)"),
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}, 'got "GET"'),
        ({**base, "logit_bias": {"5": None}}, "got null"),
    ]
    for line, expected in cases:
        error = parse_line(json.dumps(line), 1, set())
        assert expected in error.message, (line, error.message)  # type: ignore[union-attr]
        assert not re.search(r"\b(True|False|None)\b|got '", error.message)  # type: ignore[union-attr]


def test_serve_help_says_what_host_does():  # type: ignore[no-untyped-def]
    import argparse

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = " ".join(sub.choices["serve"].format_help().split())
    assert "localhost only" not in text
    assert "127.0.0.1 accepts connections from this machine only" in text
    assert "0.0.0.0 from every network interface" in text


def test_structured_output_from_the_package_namespace(llm):  # type: ignore[no-untyped-def]
    spec = GrammarSpec.from_request(guided_regex="w1[0-9]")
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, structured=spec))
    assert re.fullmatch(r" ?w1[0-9]", out.text) and out.finish_reason == "stop"


def test_the_python_api_prices_its_eta_from_planned_work(llm, monkeypatch):  # type: ignore[no-untyped-def]
    """``LLM.generate``'s progress knows the batch's planned work and is told the work done,
    so its ETA counts tokens left, not finished requests (which under the plan's order finish
    late: a count-based ETA read hours for a job seconds from its end)."""
    from prefixbatch import llm as llm_module
    from prefixbatch.io.progress import Progress

    made: list[Progress] = []
    works: list[tuple[int, int] | None] = []

    class Recording(Progress):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            made.append(self)

        def update(self, requests, tokens, note="", work=None):  # type: ignore[no-untyped-def]
            works.append(work)
            super().update(requests, tokens, note, work)

    monkeypatch.setattr(llm_module, "Progress", Recording)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13 + i] for i in range(4)]
    llm.generate(prompts, SamplingParams(max_tokens=3, n=2, ignore_eos=True), use_tqdm=False)
    planned = made[0].planned
    assert planned is not None and planned.output_tokens == 4 * 3 * 2
    assert 9 <= planned.prefill_tokens <= 4 * 9  # the shared 8-token block at most once more
    assert len(works) == 4 and all(w is not None for w in works)
    assert works[-1] == (llm.engine.stats.prefill_tokens_computed, 4 * 3 * 2)
