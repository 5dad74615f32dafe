"""Planning cost at job scale: 100,000 prompts of about 1,000 tokens (system prompt > one of
2,000 documents > question), shuffled. Times the sort (the radix tree as sorted prompts and their
LCPs), the whole plan and the report's baselines (no model involved) and reports peak memory.

    python bench/plan_scale.py [--prompts 100000] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
from common import machine, timed

from prefixbatch.planning.plan import make_plan
from prefixbatch.planning.prefix_sort import sort_prompts
from prefixbatch.planning.report import tree_baselines
from prefixbatch.planning.token_arrays import TokenArrays


def prompts(n: int, tokens: int, docs: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    system = rng.integers(100, 50000, 200, dtype=np.int32)
    bodies = [rng.integers(100, 50000, tokens - 260, dtype=np.int32) for _ in range(docs)]
    out = []
    for i in rng.permutation(n):
        question = rng.integers(100, 50000, 60, dtype=np.int32)
        out.append(np.concatenate([system, bodies[i % docs], question]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=2000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    batch, made = timed(
        lambda: TokenArrays.from_lists(prompts(args.prompts, args.tokens, args.docs))
    )
    total = batch.num_tokens
    print(f"{args.prompts} prompts, {total} tokens (generated in {made:.1f}s)")
    tree, tree_s = timed(lambda: sort_prompts(batch))
    plan, plan_s = timed(lambda: make_plan(batch, [64] * len(batch), 16))
    (multilevel, _), report_s = timed(lambda: tree_baselines(batch.lengths, tree, 16))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"sort: {tree_s:.1f}s; whole plan (sort, levels, savings): {plan_s:.1f}s; "
        f"{total / plan_s / 1e6:.1f}M tokens/s; report baselines (token-level tree, one-level): "
        f"{report_s:.1f}s"
    )
    print(
        f"levels: {len(plan.shared_groups)}, R_saving {plan.r_saving:.3f} "
        f"(token-level tree {1 - multilevel / total:.3f}); peak RSS {peak:.1f} GiB "
        f"({total * 4 / 2**30:.1f} GiB of int32 tokens)"
    )


if __name__ == "__main__":
    main()
