"""Shared-prefix workloads: prefixbatch's batchllm policy against its fcfs-lru policy (first
come first served with an LRU automatic prefix cache, what vLLM does), transformers' batched
generate, and vLLM when a Python with vllm installed is given. Same token-id prompts, greedy,
EOS ignored (every engine makes the same tokens), the same KV budget for both policies.

    python bench/prefix_workloads.py [--scale 1] [--kv-cache-memory 128MiB] [--no-hf]
                                     [--vllm-python /path/to/venv/bin/python]

Each engine's start-up (prefixbatch: model load and warm-up, kernel build cached; vLLM: engine
start and warm-up) is printed beside its throughput, and end-to-end seconds (start-up + job).
Run it at the tight budget (128MiB) and at a generous one (4GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, table, timed
from engine_vs_hf import hf_generate
from workloads import ALL, Workload

from prefixbatch import LLM, SamplingParams


def run_engine(llm: LLM, w: Workload, policy: str) -> tuple[float, dict[str, float]]:
    llm = llm.with_policy(policy)
    params = SamplingParams(max_tokens=w.max_tokens, temperature=0, ignore_eos=True)
    outs, secs = timed(lambda: llm.generate(w.prompts, params))
    stats = llm.engine.stats
    return secs, {
        "tokens": sum(len(o.output_token_ids) for o in outs),
        "prefill": stats.prefill_tokens_computed,
        "preempt": stats.preemptions,
    }


def run_vllm(
    python: str, model: Path, w: Workload, kv_bytes: int, preload: str | None = None
) -> tuple[float, float]:
    """(start-up seconds, generation seconds) of vLLM on every core with the same KV budget;
    ``preload``: a caching allocator's shared library for ``LD_PRELOAD`` (vLLM's CPU install
    guide recommends TCMalloc this way)."""
    cores = os.cpu_count() or 1
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    if preload:
        env["LD_PRELOAD"] = preload
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "w.json"
        spec.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "prompts": w.prompts,
                    "max_tokens": w.max_tokens,
                    "kv_bytes": kv_bytes,
                }
            )
        )
        out = subprocess.run(
            [python, str(Path(__file__).with_name("vllm_peer.py")), str(spec)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )

    def mark(name: str) -> float:
        lines = [x for x in out.stdout.splitlines() if x.startswith(f"PREFIXBATCH_{name}")]
        return float(lines[-1].split()[1])

    return mark("STARTUP"), mark("SECONDS")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--kv-cache-memory", default="128MiB")
    parser.add_argument("--workloads", default=",".join(ALL))
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--vllm-python")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    llm, startup = timed(lambda: LLM(kv_cache_memory=args.kv_cache_memory))
    print(
        f"model: {llm.engine.model_name}, KV budget {args.kv_cache_memory} "
        f"({llm.engine.limits.num_blocks} blocks of {llm.engine.config.block_size} tokens)"
    )
    _, warm = timed(lambda: llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2)))
    startup += warm
    print(f"prefixbatch start-up: {startup:.1f}s (model load, warm-up; kernel cached)")
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            str(llm.engine.loaded.source.path), dtype=torch.float32
        ).eval()
    eos = list(llm.engine.eos_ids)
    rows = []
    for key in args.workloads.split(","):
        w = ALL[key](args.scale)
        batch, batch_s = run_engine(llm, w, "batchllm")
        lru, lru_s = run_engine(llm, w, "fcfs-lru")
        row = {
            "workload": w.name,
            "requests": len(w.prompts),
            "prompt tok": w.prompt_tokens,
            "prefill batchllm": batch_s["prefill"],
            "prefill fcfs-lru": lru_s["prefill"],
            "batchllm tok/s": f"{batch_s['tokens'] / batch:.1f}",
            "fcfs-lru tok/s": f"{lru_s['tokens'] / lru:.1f}",
            "batchllm / fcfs-lru": f"{lru / batch:.2f}x",
            "batchllm e2e s": f"{startup + batch:.1f}",
        }
        if hf is not None:
            requests = [(p, w.max_tokens) for p in w.prompts]
            made, secs = timed(lambda r=requests, e=eos: hf_generate(hf, r, 32, e, True))
            row["transformers tok/s"] = f"{made / secs:.1f}"
            row["batchllm / transformers"] = f"{secs / batch:.2f}x"
        if args.vllm_python:
            model = llm.engine.loaded.source.path
            vllm_up, secs = run_vllm(args.vllm_python, model, w, llm.engine.kv_bytes)
            row["vLLM tok/s"] = f"{len(w.prompts) * w.max_tokens / secs:.1f}"
            row["batchllm / vLLM"] = f"{secs / batch:.2f}x"
            row["vLLM start-up s"] = f"{vllm_up:.1f}"
            row["vLLM e2e s"] = f"{vllm_up + secs:.1f}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
