"""The command line a newcomer meets: --version, help text, and ``prefixbatch plan``."""

from __future__ import annotations

import argparse
import json

import pytest
from test_job import chat_line, write_jsonl

from conftest import nested_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.cli import build_parser, main


def test_version(capsys):  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "prefixbatch 0.1.0"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_every_option_has_help_and_shows_its_default(command):  # type: ignore[no-untyped-def]
    parser = build_parser()
    assert "`" not in (parser.description or "")
    sub = _subparsers(parser)[command]
    text = sub.format_help()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.dest} has no help text"
        if action.option_strings and action.default is not None:
            assert f"(default: {action.default})" in " ".join(text.split())


def test_plan_takes_only_the_options_it_uses(capsys):  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        main(["plan", "in.jsonl", "--policy", "fcfs"])
    assert e.value.code == 2 and "unrecognized arguments: --policy" in capsys.readouterr().err


def test_plan_report_words_keys_and_rejected_lines(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    lines = [chat_line(i) for i in range(6)]
    lines += ["{broken", {"custom_id": "oov", "prompt": [5, 100000]}]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["plan", str(inp), "--model", str(tiny_models["llama"]), "--block-size", "8"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 6 and report["rejected_lines"] == 2
    assert report["groups"] == 3  # three shared documents
    assert main(args) == 0
    text = capsys.readouterr().out
    labels = [line.split(":", 1)[0] for line in text.splitlines()]
    assert labels and set(labels) <= set(report)  # every text label is a --json key
    assert "requests: 6 requests in the plan" in text
    assert "rejected_lines: 2 lines left out" in text
    assert "groups: 3 groups of requests that share a prefix" in text


def test_plan_lru_estimate_bounds_what_fcfs_lru_saves(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    import random

    prompts = nested_prompts(random.Random(3), system=24, doc=40, docs=4, per_doc=4, vocab=(3, 500))
    lines = [{"custom_id": f"r{i}", "prompt": p, "max_tokens": 2} for i, p in enumerate(prompts)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    model = str(tiny_models["llama"])
    assert main(["plan", str(inp), "--model", model, "--block-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    blocks = report["lru_capacity_blocks"]
    llm = LLM(model, device="cpu", block_size=8, policy="fcfs-lru", kv_cache_memory=blocks * 3072)
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0))
    stats = llm.engine.stats
    actual_saved = stats.prompt_tokens - stats.prefill_tokens_computed
    predicted_saved = report["prompt_tokens"] - report["lru_prefill_tokens"]
    assert 0 < actual_saved <= predicted_saved  # the report says it is an upper bound
