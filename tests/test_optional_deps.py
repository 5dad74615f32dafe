"""The core runs with torch and transformers alone: in a subprocess where every optional package
is unimportable (as on a machine that never installed them), a greedy job runs, a structured or
log-probability line (and a forced tool call's grammar) gets its own error naming xgrammar, and
``serve``, ``--workers`` and a ``.gguf`` model stop with a one-line error naming their package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Set to None in sys.modules, a module fails to import and importlib.util.find_spec says it is
# absent: what an environment without the package does.
CHILD = """
import contextlib, io, json, os, sys

BLOCKED = ("xgrammar", "fastapi", "uvicorn", "starlette", "python_multipart", "multipart", "ray",
           "openai", "gguf", "jsonschema")
for name in BLOCKED:
    sys.modules[name] = None

from prefixbatch.cli import main

model, inp, fake_gguf, work = sys.argv[1:]
engine = ["--device", "cpu", "--kv-cache-memory", "16MiB"]
quiet_run = ["run", inp, "--quiet", "--model"]
results = {}
for case, argv in {
    "run": [*quiet_run, model, "-o", f"{work}/out.jsonl"],
    "serve": ["serve", "--model", model, "--data-dir", f"{work}/data"],
    "workers": [*quiet_run, model, "-o", f"{work}/ray.jsonl", "--workers", "2"],
    "gguf": [*quiet_run, fake_gguf, "-o", f"{work}/gguf.jsonl"],
}.items():
    if case == "gguf":  # its content hash is recorded in the cache: a throwaway one
        os.environ["PREFIXBATCH_CACHE"] = f"{work}/cache"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*argv, *engine])
    results[case] = [rc, err.getvalue()]
os.environ.pop("PREFIXBATCH_CACHE")

from prefixbatch import LLM, SamplingParams
from prefixbatch.grammar_spec import GrammarSpec

llm = LLM(model, device="cpu", kv_cache_memory=16 * 2**20)
greedy = SamplingParams(max_tokens=3, temperature=0)
results["api_greedy"] = llm.generate([[5, 6, 7, 8]], greedy)[0].output_token_ids
try:
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, structured=GrammarSpec("json_object")))
except ValueError as e:
    results["api_structured"] = str(e)
from prefixbatch.execution.tool_grammar import CallSyntax, tool_call_grammar

try:  # a forced tool call's grammar
    tool_call_grammar(CallSyntax("<tool_call>", "", "</tool_call>", ""), (("f", "{}"),), False)
except ValueError as e:
    results["tool_grammar"] = str(e)
results["loaded"] = sorted(m for m in sys.modules if sys.modules[m] is not None
                           and m.split(".")[0] in BLOCKED)
print(json.dumps(results))
"""


def test_job_runs_without_optional_packages(tmp_path: Path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    from conftest import hf_greedy

    lines = [
        {"custom_id": "plain", "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0},
        {"custom_id": "json", "prompt": [5, 6, 7], "response_format": {"type": "json_object"}},
        {"custom_id": "regex", "prompt": [5, 6], "guided_regex": "[ab]+"},
        {"custom_id": "logprobs", "prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 1},
        {"custom_id": "chat", "messages": [{"role": "user", "content": "w7 w8"}], "max_tokens": 2},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF" + bytes(60))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    model = str(tiny_models["llama"])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(inp), str(fake_gguf), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["loaded"] == []

    rc, err = results["run"]
    assert rc == 0, err
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    records = {r["custom_id"]: r for r in map(json.loads, written)}
    assert records["plain"]["error"] is None and records["chat"]["error"] is None
    expected = hf_greedy(tiny_models["llama"], [[5, 6, 7, 8]], [3])[0]
    assert results["api_greedy"] == expected
    for refused in ("json", "regex", "logprobs"):
        message = records[refused]["error"]["message"]
        assert "needs the xgrammar package (pip install xgrammar)" in message, message
    assert "structured output" in records["json"]["error"]["message"]
    assert "log-probabilities" in records["logprobs"]["error"]["message"]
    assert "xgrammar" in results["api_structured"]
    assert "needs the xgrammar package" in results["tool_grammar"]

    for case, package in (("serve", "fastapi"), ("workers", "ray"), ("gguf", "gguf")):
        rc, err = results[case]
        last = err.splitlines()[-1]
        assert rc == 2 and last.startswith("prefixbatch: error: ") and package in last, (case, err)
