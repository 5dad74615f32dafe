"""The GPU check (issue #24) in one call, staged and fail-soft: 7 minutes on one H200.

Stages, in order, each in its own process with its own time limit (a crash, a CUDA error or a
hang costs that stage only), each appending its rows to ``--out`` (JSON lines) as they exist:

0. versions: device, Python, torch, CUDA, triton, transformers; whether prefixbatch and its
   engine import, and which optional packages are absent.
1. kernel tests: the Triton kernel and CUDA-graph tests on the device against the float64
   reference (fp32, fp16, bf16; split-KV; graph-padded metadata), per-test time limit.
2. kernel microbenchmarks at the 8B job's shapes (``gpu_kernels.py``): ms, GB/s, TFLOP/s.
3. greedy parity against transformers (``gpu_jobs.py``): fp32 token for token, bf16 divergence.
4. the job (``gpu_jobs.py``): an 8B Llama-3-shaped model with random bf16 weights built on the
   device, G groups x 16 requests (a shared 2,000-token prefix + a 200-token suffix each, 100
   output tokens, greedy), a warm-up job with the same shapes under both policies, then 128
   and 1,024 requests under batchllm and fcfs-lru: wall time, output tok/s, MFU (2 x
   non-embedding parameters x (unique prefill + output tokens) against 800 TFLOP/s), decode
   steps timed with CUDA events around the model runner (graph replays included), Triton
   compiles during each job.
5. transformers' continuous batching on the 128-request job (last: the slowest).

Each stage's limit runs to a deadline (the budgets below, summed), so time a stage leaves
unused goes to the later ones. ``--dry-run`` runs every stage at tiny sizes on the CPU, the
kernels under Triton's interpreter; ``--in-process`` runs the stages here, without limits.

    PYTHONPATH=src timeout 450 python bench/gpu_check.py --out $OUT/gpu_check.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_common import DRY, GPU, Recorder, Sizes

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("xgrammar", "gguf", "fastapi", "uvicorn", "python_multipart", "ray", "openai")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # on one H200; the budgets add up to 7 minutes
    target: str  # "module:function", called with (sizes, recorder)

    def function(self) -> Callable[[Sizes, Recorder], None]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


STAGES = (
    Stage("versions", 20, "gpu_check:versions"),
    Stage("kernel_tests", 70, "gpu_check:kernel_tests"),
    Stage("kernel_bench", 40, "gpu_kernels:run"),
    Stage("parity", 35, "gpu_jobs:parity"),
    Stage("jobs", 160, "gpu_jobs:jobs"),
    Stage("transformers", 95, "gpu_jobs:transformers_cb"),
)


def versions(sizes: Sizes, rec: Recorder) -> None:
    """Stage 0: what the machine runs, and whether the package imports there."""
    import torch
    import transformers

    row: dict[str, Any] = {
        "check": "versions",
        "device": torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (dry run)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = "not installed"
    try:
        importlib.import_module("prefixbatch.engine")
        row["import"] = "ok"
    except Exception as e:  # the row says why; later stages fail on it too
        row["import"] = f"{type(e).__name__}: {e}"
    row["optional_missing"] = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    rec.record(row)


def kernel_tests(sizes: Sizes, rec: Recorder) -> None:
    """Stage 1: pytest on the kernel tests (on CUDA their GPU cases; xdist workers compile in
    parallel when pytest-xdist is there), stopped before the stage's deadline. One row:
    counts, failures, and the time."""
    args = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *sizes.kernel_tests]
    if importlib.util.find_spec("pytest_timeout"):
        args += ["--timeout", "60"]
    if sizes.device == "cuda" and importlib.util.find_spec("xdist"):
        args += ["-n", "8"]
    limit = None if rec.deadline is None else max(5.0, rec.deadline - time.time() - 5)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    start = time.perf_counter()
    try:
        run = subprocess.run
        done = run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        output, status = done.stdout + done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as e:
        output, status = _text(e.stdout) + _text(e.stderr), f"stopped after {limit:.0f} s"
    outcomes = pytest_outcomes(output)
    print("\n".join(output.splitlines()[-30:]), flush=True)
    rec.record({
        "check": "kernel tests",
        "pytest": status,
        **{k.lower(): len(outcomes.get(k, ())) for k in ("PASSED", "FAILED", "SKIPPED")},
        "errors": len(outcomes.get("ERROR", ())),
        "failures": sorted(outcomes.get("FAILED", set()) | outcomes.get("ERROR", set()))[:12],
        "seconds": round(time.perf_counter() - start, 1),
    })  # fmt: skip


def pytest_outcomes(output: str) -> dict[str, set[str]]:
    """Test ids by outcome (PASSED, FAILED, ERROR, SKIPPED) in ``pytest -v`` output, with or
    without xdist; a test the summary repeats counts once."""
    outcomes: dict[str, set[str]] = {}
    for line in output.splitlines():
        found = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED)\b", line)
        test = re.search(r"(tests/\S+::\S+)", line)
        if found and test:
            outcomes.setdefault(found.group(1), set()).add(test.group(1))
    return outcomes


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def run_child(stage: Stage, argv: list[str], limit: float) -> tuple[str, str]:
    """Run ``stage`` in a child process (its own process group: a timeout ends whatever it
    started too), echoing its output; (status, the output's last lines)."""
    cmd = [sys.executable, "-u", __file__, "--stage", stage.name, *argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    tail: deque[str] = deque(maxlen=20)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"  | {line}", end="", flush=True)
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = "ok" if proc.wait(timeout=limit) == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {limit:.0f} s"
    reader.join(timeout=5)
    return status, "\n".join(tail)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """batchllm / fcfs-lru and ours / transformers speed-ups per job size."""
    wall = {(r["check"], r.get("requests")): r["wall_s"] for r in rows if "wall_s" in r}
    out = []
    for (name, n), w in wall.items():
        if name == "batchllm" and ("fcfs-lru", n) in wall:
            out.append({"check": f"batchllm vs fcfs-lru, {n}", "speedup": wall["fcfs-lru", n] / w})
        if name in ("batchllm", "fcfs-lru") and ("transformers CB", n) in wall:
            ratio = wall["transformers CB", n] / w
            out.append({"check": f"{name} vs transformers, {n}", "speedup": ratio})
    return [r | {"speedup": round(r["speedup"], 2)} for r in out]


def print_tables(rows: list[dict[str, Any]]) -> None:
    from common import table

    for key in ("device", "passed", "case", "exact", "wall_s", "speedup", "status", "error"):
        kind = [r for r in rows if key in r]
        if kind:
            columns = list(dict.fromkeys(k for r in kind for k in r))
            print(table([{k: r.get(k, "") for k in columns} for r in kind]))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON lines (default: $OUT/gpu_check.jsonl, "
                        "else a new temporary folder)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--stages", help="comma-separated stage names (default: all, in order)")
    parser.add_argument("--limits", default="", help="NAME=SECONDS,... replacing budgets")
    parser.add_argument("--in-process", action="store_true", help="no child processes/limits")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # a child runs this one stage
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if args.dry_run:  # read when a kernel is decorated: before any stage imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    out: Path = args.out or default / "gpu_check.jsonl"
    by_name = {s.name: s for s in STAGES}
    if args.stage:  # a child: run it; a failure shows in the exit code and the output
        rec = Recorder(out, args.stage, args.deadline)
        by_name[args.stage].function()(sizes, rec)
        return rec.rows
    names = args.stages.split(",") if args.stages else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown stages {unknown}; stages: {', '.join(by_name)}")
    print(f"GPU check: rows go to {out}", flush=True)
    limits = {k: float(v) for k, v in (kv.split("=") for kv in args.limits.split(",") if kv)}
    out.parent.mkdir(parents=True, exist_ok=True)
    already = out.stat().st_size if out.exists() else 0
    start = time.time()
    deadline = start
    for name in names:
        stage = by_name[name]
        deadline += limits.get(name, stage.budget_s)
        print(f"== stage {name} ({time.time() - start:.0f} s)", flush=True)
        began = time.time()
        if args.in_process:
            stage_rec = Recorder(out, name)
            ok = stage_rec.attempt(name, lambda s=stage, r=stage_rec: s.function()(sizes, r))
            status, tail, limit = ("ok" if ok else "failed"), "", None
        else:
            limit = round(max(1.0, deadline - time.time()), 1)
            child = ["--out", str(out), "--deadline", str(deadline)]
            status, tail = run_child(stage, child + (["--dry-run"] if args.dry_run else []), limit)
        row = {"check": "stage", "name": name, "status": status,
               "seconds": round(time.time() - began, 1), "limit_s": limit}  # fmt: skip
        Recorder(out).record(row | ({"tail": tail} if status != "ok" else {}))
    with out.open() as f:
        f.seek(already)
        rows = [json.loads(line) for line in f if line.strip()]
    summary = Recorder(out)
    for row in ratios(rows):
        summary.record(row)
    rows += summary.rows
    print_tables(rows)
    return rows


if __name__ == "__main__":
    main()
