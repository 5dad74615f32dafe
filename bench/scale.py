"""A large chat batch on one machine: `prefixbatch plan` and the start of `prefixbatch run` at a
given size, against the tokenizer alone, with wall time, prompt tokens/s, peak RSS and bytes per
prompt token.

The batch (seeded): N chat lines, each one of 100 distinct system prompts (~300 tokens with
SmolLM2's tokenizer) and a distinct user question (~40 tokens), 16 output tokens. Each command
runs in its own process; its peak RSS is that process's ``ru_maxrss`` (or, for `run`, its
``VmHWM`` when the first answers are on disk). Bytes per prompt token are counted over the same
command on a small batch (``--baseline-lines``), so imports and the model do not count.

The peer measured in the same run is the tokenizer alone: read the file, render every chat
through the template and batch-encode the texts (the Rust tokenizer on every core, batches of
4,096 texts), which is what any planner has to do at least once. Every wall time is the whole
process's, start-up included (Python, imports, loading the tokenizer).

    python bench/scale.py --lines 100000 [--run-answers 16] [--kv-cache-memory 4GiB]
    python bench/scale.py --lines 1000000 --no-run      # the plan target (1M lines)
    python bench/scale.py --lines 20000 --baseline-src /path/to/older/checkout/src

``--baseline-src`` measures the same commands with another prefixbatch (e.g. the code before
this benchmark's changes) in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import machine, table

SYLLABLES = "ka lo mi ren ta so vel di ar po nu ex tri bel gan ho qui zo fer lan".split()
# Measured on a quiet 2-core AMD EPYC at 100,000 lines (issue #22), before the compact path.
BEFORE = {"plan": (74.5, 5.95), "run": (102.0, 11.1)}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)
    )


def write_batch(path: Path, lines: int, seed: int = 0, max_tokens: int = 16) -> None:
    """N chat lines: 100 system prompts of 148 words, a 21-word question each (seeded)."""
    rng = random.Random(seed)
    systems = [_words(rng, 148) for _ in range(100)]
    with open(path, "w") as f:
        for i in range(lines):
            messages = [
                {"role": "system", "content": systems[rng.randrange(len(systems))]},
                {"role": "user", "content": _words(rng, 21)},
            ]
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps(line | {"body": body}) + "\n")


def tokenizer_alone(path: Path, model: str | None) -> None:
    """The peer: read, render and batch-encode every chat; prints the prompt tokens."""
    from prefixbatch.loading.model_source import resolve_model
    from prefixbatch.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model(model).path)
    tokens, texts = 0, []
    with open(path, "rb") as f:
        for raw in f:
            texts.append(tokenizer.render_chat(json.loads(raw)["body"]["messages"]))
            if len(texts) == 4096:
                tokens += sum(map(len, tokenizer.hf(texts, add_special_tokens=False)["input_ids"]))
                texts = []
    if texts:
        tokens += sum(map(len, tokenizer.hf(texts, add_special_tokens=False)["input_ids"]))
    print(json.dumps({"prompt_tokens": tokens}))


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_gib: float
    prompt_tokens: int
    out: str


def _env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _peak_of_child(cmd: list[str], env: dict[str, str]) -> Measured:
    """Run ``cmd`` in a fresh process (through a wrapper so ru_maxrss is that process's)."""
    wrapper = (
        "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "s = time.perf_counter() - t; "
        "print(json.dumps({'rc': p.returncode, 's': s, 'out': p.stdout, 'err': p.stderr[-2000:], "
        "'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env
    )
    res = json.loads(done.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res['err']}")
    return Measured(res["s"], res["kib"] / 2**20, 0, res["out"])


def measure_plan(path: Path, model: str | None, src: str | None) -> Measured:
    cmd = [sys.executable, "-m", "prefixbatch.cli", "plan", str(path), "--json"]
    cmd += ["--model", model] if model else []
    m = _peak_of_child(cmd, _env(src))
    report = json.loads(m.out)
    return Measured(m.seconds, m.peak_gib, report["prompt_tokens"], m.out)


def measure_tokenizer(path: Path, model: str | None, src: str | None) -> Measured:
    cmd = [sys.executable, __file__, "--tokenizer-alone", str(path)]
    cmd += ["--model", model] if model else []
    m = _peak_of_child(cmd, _env(src))
    res = json.loads(m.out)
    return Measured(m.seconds, m.peak_gib, res["prompt_tokens"], m.out)


def _vm_hwm_gib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kib / 2**20


def measure_run_start(
    path: Path, model: str | None, src: str | None, answers: int, kv: str, workdir: Path
) -> Measured:
    """`prefixbatch run` until ``answers`` answers are on disk; peak RSS (VmHWM) just before
    the first answer appeared, and the wall time to it."""
    out = workdir / f"run-{os.getpid()}-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "prefixbatch.cli", "run", str(path), "-o", str(out), "--quiet"]
    cmd += ["--kv-cache-memory", kv] + (["--model", model] if model else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(src), stderr=subprocess.PIPE, text=True)
    peak, first = 0.0, None
    try:
        while proc.poll() is None:
            lines = out.read_bytes().count(b"\n") if out.exists() else 0
            if lines == 0:
                peak = max(peak, _vm_hwm_gib(proc.pid))
            elif first is None:
                first = time.perf_counter() - start
            if lines >= answers:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        out.unlink(missing_ok=True)
    if first is None:
        raise RuntimeError(f"run gave no answer: {err[-2000:]}")
    return Measured(first, peak, 0, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--baseline-lines", type=int, default=1000)
    parser.add_argument("--model", help="model directory or GGUF (default: the embedded one)")
    parser.add_argument("--run-answers", type=int, default=16, help="stop run after N answers")
    parser.add_argument("--no-run", action="store_true", help="measure plan and tokenizer only")
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--baseline-src", help="also measure another prefixbatch src folder")
    parser.add_argument("--workdir", type=Path, help="where the batch files go (default: tmp)")
    parser.add_argument("--tokenizer-alone", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenizer_alone:
        tokenizer_alone(args.tokenizer_alone, args.model)
        return
    print(f"machine: {machine()}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small, big = Path(tmp) / "small.jsonl", Path(tmp) / "big.jsonl"
        write_batch(small, args.baseline_lines)
        write_batch(big, args.lines)
        print(f"batch: {args.lines} lines ({big.stat().st_size / 2**20:.0f} MiB)")
        peer = measure_tokenizer(big, args.model, None)
        rows = [_row("tokenizer alone", peer, peer.prompt_tokens, None, peer)]
        for label, src in [("this", None), ("baseline-src", args.baseline_src)]:
            if label == "baseline-src" and not src:
                continue
            base = measure_plan(small, args.model, src)
            plan = measure_plan(big, args.model, src)
            rows.append(_row(f"plan ({label})", plan, plan.prompt_tokens, base, peer))
            if not args.no_run:
                start = measure_run_start(
                    big, args.model, src, args.run_answers, args.kv_cache_memory, Path(tmp)
                )
                rows.append(
                    _row(f"run to 1st answer ({label})", start, plan.prompt_tokens, None, peer)
                )
    print(table(rows))
    print(
        f"before (issue #22, 100,000 lines, AMD EPYC 2 cores): plan {BEFORE['plan'][0]} s, "
        f"{BEFORE['plan'][1]} GiB (162-168 bytes per prompt token); run to the first answer "
        f"{BEFORE['run'][0]} s, {BEFORE['run'][1]} GiB"
    )
    print(
        "targets at 1,000,000 lines: plan peak <= 3.5 GiB and <= 8 bytes per prompt token over "
        "the small batch, time <= the tokenizer alone; run peak before the first answer <= KV "
        "pool + weights + 3 GiB"
    )


def _row(
    name: str, m: Measured, tokens: int, base: Measured | None, peer: Measured
) -> dict[str, str]:
    per_token = f"{(m.peak_gib - base.peak_gib) * 2**30 / tokens:.1f}" if base is not None else "-"
    return {
        "command": name,
        "wall s": f"{m.seconds:.1f}",
        "x tokenizer": f"{m.seconds / peer.seconds:.2f}",
        "prompt tok/s": f"{tokens / m.seconds / 1e3:.0f}k",
        "peak RSS GiB": f"{m.peak_gib:.2f}",
        "bytes/prompt token over small batch": per_token,
    }


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
