"""Where a step's time goes: one prefill-heavy and one decode-heavy step of the engine under
``torch.profiler``, split into projections, prefill attention, decode attention, element-wise
ops (norms, rope, SiLU, residuals, the K/V write), sampling, host-side step preparation and
Python overhead. The compiled CPU kernels (element-wise and attention) are named ranges here.

    python bench/profile_steps.py [--kv-cache-memory 4GiB] [--decode-batch 64]

Categories: an op's self CPU time goes to the first category whose pattern its name matches;
"host preparation" is the step's wall time outside the model forward and the sampler (scheduling,
building the step's index arrays, detokenizing); "Python and dispatch" is the forward's wall time
not spent inside any op.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable
from typing import Any

from common import machine, table
from torch.profiler import ProfilerActivity, profile, record_function

from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.models.fused_forward import FusedForward
from prefixbatch.outputs import Request
from prefixbatch.planning.plan import make_plan

CATEGORIES = [
    ("projections", r"mkldnn.*linear|aten::(linear|addmm|mm|matmul)$"),
    ("decode attention", r"paged_decode|attend_prefix_levels|aten::index_select|aten::bmm"),
    ("prefill attention", r"prefill_attention|scaled_dot_product|flash_attention|_scaled_dot"),
    ("sampling", r"argmax|topk|sort|cumsum|exponential|softmax|bitwise|aten::remainder"),
    (
        "element-wise (norm, rope, SiLU, residual)",
        r"prefixbatch::(rms_norm|fused_add_rms_norm|silu_and_mul|rotary_embedding|write_kv)"
        r"|aten::(mul|add|sub|pow|mean|rsqrt|cat|silu|neg|div|to|_to_copy|copy_|embedding"
        r"|index_copy_|index|chunk|split|slice|view|reshape|contiguous|empty|clone|float|cos|sin)",
    ),
]


class NamedKernels:
    """A compiled kernel module (fused element-wise ops, attention), each call a named range the
    profiler shows (pybind calls are invisible to it). Only here: a range costs more than many
    kernel calls."""

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.kernels, name)

        def named(*args: Any) -> Any:
            with record_function(f"prefixbatch::{name}"):
                return fn(*args)

        return named


def classify(name: str) -> str:
    return next((c for c, pat in CATEGORIES if re.search(pat, name)), "other ops")


def profile_step(llm: LLM) -> tuple[dict[str, float], float, int, int]:
    """Profile one engine step: (ms per category, wall ms, query rows, sequences)."""
    engine = llm.engine
    runner = engine.runner
    forward_ms = 0.0
    execute = runner.execute

    def timed_execute(step, *rest):  # type: ignore[no-untyped-def]
        nonlocal forward_ms
        start = time.perf_counter()
        out = execute(step, *rest)
        forward_ms = 1000 * (time.perf_counter() - start)
        timed_execute.rows = sum(step.num_tokens)  # type: ignore[attr-defined]
        timed_execute.seqs = len(step.seqs)  # type: ignore[attr-defined]
        return out

    runner.execute = timed_execute  # type: ignore[method-assign]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        engine.step()
        wall = 1000 * (time.perf_counter() - start)
    runner.execute = execute  # type: ignore[method-assign]
    ms: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("ProfilerStep") or evt.self_cpu_time_total <= 0:
            continue
        cat = classify(evt.key)
        ms[cat] = ms.get(cat, 0.0) + evt.self_cpu_time_total / 1000
    in_ops = sum(v for k, v in ms.items() if k != "sampling")
    ms["host preparation"] = max(0.0, wall - forward_ms - ms.get("sampling", 0.0))
    ms["Python and dispatch"] = max(0.0, forward_ms - in_ops)
    return ms, wall, timed_execute.rows, timed_execute.seqs  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-memory", default="4GiB")
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    llm = LLM(kv_cache_memory=args.kv_cache_memory)
    engine = llm.engine
    worker = engine.worker
    if isinstance(worker.forward, FusedForward):
        named = NamedKernels(worker.forward.kernels)
        engine.runner.model = FusedForward(worker.model, named)  # type: ignore[arg-type]
        engine.sampler.argmax_rows = named.argmax_rows  # the greedy argmax: "sampling"
    if isinstance(engine.backend, CpuBackend):
        engine.backend.kernels = NamedKernels(engine.backend.kernels)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(args.prompt_len)]
        for _ in range(args.decode_batch)
    ]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    batch = [Request(i, p, params) for i, p in enumerate(prompts)]
    engine.add_requests(batch, make_plan(prompts, [64] * len(prompts), 16))
    rows = []
    prefill, wall, n, s = profile_step(llm)  # the first step: a full prefill chunk
    rows.append(("prefill-heavy", prefill, wall, n, s))
    while engine.has_unfinished():  # run until every sequence decodes
        step_rows = engine.scheduler.running
        if len(step_rows) == len(prompts) and all(q.pending == 1 for q in step_rows):
            break
        engine.step()
    decode, wall, n, s = profile_step(llm)
    rows.append(("decode-heavy", decode, wall, n, s))
    while engine.has_unfinished():
        engine.step()
    cats = [c for c, _ in CATEGORIES] + ["other ops", "host preparation", "Python and dispatch"]
    out = []
    for name, ms, wall, n, s in rows:
        row = {"step": name, "rows": n, "sequences": s, "wall ms": f"{wall:.1f}"}
        for c in cats:
            row[c] = f"{ms.get(c, 0.0):.1f} ({100 * ms.get(c, 0.0) / wall:.0f}%)"
        out.append(row)
    print(table(out))


if __name__ == "__main__":
    main()
