"""How evenly whole prefix groups spread over Ray workers: max / mean worker cost (prefill tokens
after sharing + decode tokens) for 1-64 workers on a large synthetic plan, for the static
longest-processing-time-first assignment and for the chunk queue the driver runs (simulated with
equally fast workers pulling the next chunk when they finish).

    python bench/shard_balance.py [--prompts 50000]
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np
from common import machine, table, timed
from plan_scale import docs

from prefixbatch.distributed.sharding import lpt_assign, make_chunks, plan_units
from prefixbatch.planning.plan import make_plan


def simulate_queue(chunk_costs: list[float], workers: int) -> list[float]:
    """Each chunk goes to the worker that becomes free first."""
    free = [(0.0, w) for w in range(workers)]
    loads = [0.0] * workers
    for c in chunk_costs:
        t, w = heapq.heappop(free)
        loads[w] += c
        heapq.heappush(free, (t + c, w))
    return loads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=50_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    batch = docs(args.prompts, np.random.default_rng(0), count=3000)
    rng = np.random.default_rng(1)
    max_tokens = rng.choice([16, 64, 512], size=len(batch)).tolist()
    plan, secs = timed(lambda: make_plan(batch, max_tokens, 16))
    print(
        f"{len(batch)} prompts (one system prompt > 3,000 documents > questions) planned "
        f"in {secs:.1f}s"
    )
    rows = []
    for workers in (1, 2, 4, 8, 64):
        units = plan_units(plan, workers)
        costs = [u.cost for u in units]
        static = [sum(costs[i] for i in part) for part in lpt_assign(costs, workers)]
        chunks = make_chunks(units, workers)
        queue = simulate_queue([sum(u.cost for u in c) for c in chunks], workers)
        mean = sum(costs) / workers
        rows.append(
            {
                "workers": workers,
                "units": len(units),
                "largest unit": f"{max(costs) / sum(costs):.2%}",
                "LPT max/mean": f"{max(static) / mean:.3f}",
                "chunks": len(chunks),
                "chunk queue max/mean": f"{max(queue) / mean:.3f}",
            }
        )
    print(table(rows))


if __name__ == "__main__":
    main()
