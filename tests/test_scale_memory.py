"""Memory at scale, measured in a fresh process (its peak RSS over its RSS before the work):
resuming over a 100,000-record output holds an index, not the records; planning 20,000 chat
requests stays within a few bytes per prompt token (it was about 150 before the compact
store and planner; about 19 now at this size, where fixed costs weigh most). Generous bounds:
they catch a slide back, not noise."""

from __future__ import annotations

import json
import subprocess
import sys

from prefixbatch.io.batch_file import COMPLETIONS_URL, request_hash

# VmHWM, not ru_maxrss: after fork and exec, Linux's ru_maxrss still counts the parent's.
GROWTH = """
import json
from pathlib import Path

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024

{setup}
before = rss("VmRSS")
{work}
print(json.dumps({{"growth": rss("VmHWM") - before, "result": result}}))
"""


def measure(setup: str, work: str) -> dict:  # type: ignore[type-arg]
    code = GROWTH.format(setup=setup, work=work)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_resume_over_100k_records_holds_an_index(tmp_path):  # type: ignore[no-untyped-def]
    n = 100_000
    with open(tmp_path / "in.jsonl", "w") as inp, open(tmp_path / "out.jsonl", "w") as out:
        for i in range(n):
            body = {"prompt": [5, 6, 7 + i % 400], "max_tokens": 4}
            inp.write(json.dumps({"custom_id": f"r{i}", **body}) + "\n")
            response = {"status_code": 200, "body": {"choices": [{"text": "w9 w9"}]}}
            record = {"id": f"batch_req_{i}", "custom_id": f"r{i}", "response": response}
            record |= {"error": None, "request_hash": request_hash(COMPLETIONS_URL, body, 4)}
            out.write(json.dumps(record) + "\n")
    setup = (
        "from prefixbatch.config import EngineConfig\n"
        "from prefixbatch.jobs.job import JobOptions, run_job\n"
        f"opts = JobOptions(Path({str(tmp_path / 'in.jsonl')!r}), "
        f"Path({str(tmp_path / 'out.jsonl')!r}), quiet=True)\n"
        f"config = EngineConfig(model={str(tmp_path / 'no-model')!r}, device='cpu')\n"
    )
    # Every request is answered: the job reads, checks and rewrites, and loads no model.
    res = measure(setup, "result = run_job(config, opts).skipped")
    assert res["result"] == n
    assert res["growth"] < 64 * 2**20, f"{res['growth'] / 2**20:.0f} MiB for {n} records"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == n


def test_planning_20k_chat_requests_stays_within_a_few_bytes_per_token(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    n, vocab = 20_000, range(3, 500)
    systems = [
        " ".join(f"w{vocab[(s * 37 + j) % len(vocab)]}" for j in range(300)) for s in range(20)
    ]
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(n):
            question = " ".join(f"w{vocab[(i * 7 + j * 13) % len(vocab)]}" for j in range(40))
            messages = [
                {"role": "system", "content": systems[i % len(systems)]},
                {"role": "user", "content": question},
            ]
            f.write(json.dumps({"custom_id": f"q{i}", "messages": messages}) + "\n")
    model = str(tiny_models["llama"])
    setup = (  # imports and the tokenizer's first load come before the measure
        "from prefixbatch.config import EngineConfig\n"
        "from prefixbatch.jobs.planning_job import plan_job\n"
        "from prefixbatch.loading.builder import read_model_config\n"
        "from prefixbatch.loading.model_source import resolve_model\n"
        "from prefixbatch.tokenizer import Tokenizer\n"
        f"Tokenizer(Path({model!r})).render_chat([{{'role': 'user', 'content': 'w5'}}])\n"
        f"read_model_config(resolve_model({model!r}))\n"
        f"config = EngineConfig(model={model!r}, device='cpu', kv_cache_memory=16 * 2**20)\n"
    )
    res = measure(setup, f"result = plan_job(config, Path({str(tmp_path / 'in.jsonl')!r}), 16)[0]")
    report = res["result"]
    assert report["requests"] == n and report["groups"] == len(systems)
    per_token = res["growth"] / report["prompt_tokens"]
    assert per_token < 32, f"{per_token:.1f} bytes per prompt token"
