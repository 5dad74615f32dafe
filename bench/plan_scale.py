"""Planning at job scale on synthetic token arrays (no tokenizer, no model): the sort, the
nested levels, the report's baselines, and what the Ray driver does with the plan (units,
chunks, each chunk's arrays and plan share), with time and peak RSS of the process that plans
(a child of this script), in bytes per prompt token.

Shapes: ``chat`` is issue #22's batch (100 system prompts of 300 tokens, a 40-token question
each, 14 template tokens); ``docs`` is a system prompt of 200 tokens > one of 2,000 documents
> a 60-token question, 1,000 tokens a prompt.

    python bench/plan_scale.py --shape chat --prompts 1000000 [--workers 8]
    python bench/plan_scale.py --shape chat --prompts 10000000   # a 64 GB node's driver
    python bench/plan_scale.py --shape docs --prompts 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from common import machine

from prefixbatch.distributed.sharding import make_chunks, plan_units
from prefixbatch.planning.plan import make_plan
from prefixbatch.planning.prefix_sort import sort_prompts
from prefixbatch.planning.report import tree_baselines
from prefixbatch.planning.token_arrays import TokenArrays
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.request_source import CompactRequests


def chat(n: int, rng: np.random.Generator) -> TokenArrays:
    """Issue #22's batch as token ids: template, one of 100 system prompts, a question."""
    systems = rng.integers(100, 49000, (100, 300), dtype=np.int32)
    head = np.array([1, 9690, 198], np.int32)  # role header before the system prompt
    mid = np.array([2, 198, 1, 4093, 198], np.int32)  # end of system, user header
    tail = np.array([2, 198, 1, 520, 9531, 198], np.int32)  # end of user, assistant header
    lengths = np.full(n, 300 + 40 + len(head) + len(mid) + len(tail), dtype=np.int64)
    arrays = TokenArrays.from_lengths(np.empty(int(lengths.sum()), np.int32), lengths)
    rows = arrays.ids.reshape(n, -1)
    for start, part in ((0, head), (303, mid), (348, tail)):
        rows[:, start : start + len(part)] = part
    which = rng.integers(0, len(systems), n)
    for s in range(0, n, 1 << 16):  # in slices: no (n, 300) temporary
        rows[s : s + (1 << 16), 3:303] = systems[which[s : s + (1 << 16)]]
    # Questions from a vocabulary of 2,000 words, so that some share their first tokens.
    rows[:, 308:348] = rng.integers(100, 2100, (n, 40), dtype=np.int32)
    return arrays


def docs(n: int, rng: np.random.Generator, count: int = 2000) -> TokenArrays:
    system = rng.integers(100, 50000, 200, dtype=np.int32)
    bodies = rng.integers(100, 50000, (count, 740), dtype=np.int32)
    lengths = np.full(n, 1000, dtype=np.int64)
    arrays = TokenArrays.from_lengths(np.empty(int(lengths.sum()), np.int32), lengths)
    rows = arrays.ids.reshape(n, -1)
    rows[:, :200] = system
    which = rng.integers(0, count, n)
    for s in range(0, n, 1 << 16):
        rows[s : s + (1 << 16), 200:940] = bodies[which[s : s + (1 << 16)]]
    rows[:, 940:] = rng.integers(100, 50000, (n, 60), dtype=np.int32)
    return arrays


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def child(args: argparse.Namespace) -> None:
    """Everything measured, in this process; prints one JSON line."""
    rng = np.random.default_rng(0)
    prompts = (chat if args.shape == "chat" else docs)(args.prompts, rng)
    tokens = prompts.num_tokens
    built = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on (Linux)
        f.write("5")
    times: dict[str, float] = {}

    def timed(name, fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - start
        return out

    tree = timed("sort", lambda: sort_prompts(prompts))
    plan = timed("plan", lambda: make_plan(prompts, np.full(len(prompts), 16), 16, tree))
    if not args.no_report:
        timed("report baselines", lambda: tree_baselines(prompts.lengths, tree, 16))
    params = SamplingParams(max_tokens=16, temperature=0)
    requests = CompactRequests(
        prompts, (params,), np.zeros(len(prompts), np.int32), np.arange(len(prompts))
    )

    def driver() -> int:  # what the Ray driver does before each chunk leaves
        chunks = make_chunks(plan_units(plan, args.workers), args.workers)
        for chunk in chunks:
            positions = np.concatenate([u.requests for u in chunk])
            requests.take(positions), plan.subset(positions)
        return len(chunks)

    chunks = timed("driver chunks", driver)
    peak = _rss("VmHWM")
    print(
        json.dumps(
            {
                "tokens": tokens,
                "levels": len(plan.shared_groups),
                "r_saving": plan.r_saving,
                "chunks": chunks,
                "times": times,
                "rss_after_arrays": built,
                "peak": peak,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--shape", choices=["chat", "docs"], default="chat")
    parser.add_argument("--workers", type=int, default=8, help="Ray workers the driver feeds")
    parser.add_argument("--no-report", action="store_true", help="skip the report baselines")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"machine: {machine()}")
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    tokens, gib = res["tokens"], 2**30
    print(
        f"{args.prompts} prompts ({args.shape}), {tokens} tokens "
        f"({tokens * 4 / gib:.2f} GiB as int32); {res['levels']} levels, "
        f"R_saving {res['r_saving']:.3f}; {res['chunks']} chunks for {args.workers} workers"
    )
    for name, secs in res["times"].items():
        print(f"{name}: {secs:.1f} s ({tokens / secs / 1e6:.1f} M tokens/s)")
    planning = res["peak"] - res["rss_after_arrays"]
    print(
        f"RSS with the arrays built {res['rss_after_arrays'] / gib:.2f} GiB, peak after "
        f"{res['peak'] / gib:.2f} GiB: planning and chunking take {planning / gib:.2f} GiB "
        f"on top ({planning / tokens:.2f} bytes per prompt token)"
    )


if __name__ == "__main__":
    main()
