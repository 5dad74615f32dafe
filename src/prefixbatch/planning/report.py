"""The plan report printed by ``prefixbatch plan`` before any compute."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .one_level import one_level_prefill_tokens
from .plan import Plan, lru_prefill_tokens, saving
from .prefix_tree import build_tree, unique_tokens


def size_bucket(n: int) -> str:
    """1, 2-3, 4-7, 8-15, ...: powers of two."""
    lo = 1 << (n.bit_length() - 1)
    return str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"


def tree_baselines(prompts: Sequence[Sequence[int]], block_size: int) -> tuple[int, int]:
    """Prefill tokens of the two tree baselines the report compares the plan with: the
    token-granularity tree (every radix edge once) and BatchLLM's one-level flattening."""
    tree = build_tree(prompts)
    lengths = [len(p) for p in prompts]
    return unique_tokens(tree), one_level_prefill_tokens(tree, lengths, block_size)


def plan_report(
    plan: Plan, prompts: Sequence[Sequence[int]], block_size: int, lru_capacity_blocks: int
) -> dict[str, Any]:
    """Everything the plan decides, as one JSON-ready dict."""
    lru = lru_prefill_tokens(prompts, block_size, lru_capacity_blocks)
    multilevel, one_level = tree_baselines(prompts, block_size) if prompts else (0, 0)
    top = plan.root.children
    sizes = Counter(size_bucket(len(g.requests())) for g in top)
    depth = {id(plan.root): 0}
    for g, parent in plan.root.walk():
        if parent is not None:
            depth[id(g)] = depth[id(parent)] + 1
    return {
        "requests": len(prompts),
        "prompt_tokens": plan.prompt_tokens,
        "groups": len(top),
        "levels": len(plan.shared_groups),
        "max_depth": max(depth.values()),
        "ungrouped_requests": len(plan.root.members),
        "group_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "block_size": block_size,
        "computed_prefill_tokens": plan.computed_prefill_tokens,
        "r_saving": round(plan.r_saving, 6),
        "multilevel_prefill_tokens": multilevel,
        "r_saving_multilevel": round(saving(multilevel, plan.prompt_tokens), 6),
        "one_level_prefill_tokens": one_level,
        "r_saving_one_level": round(saving(one_level, plan.prompt_tokens), 6),
        "lru_prefill_tokens": lru,
        "r_saving_lru_file_order": round(saving(lru, plan.prompt_tokens), 6),
        "lru_capacity_blocks": lru_capacity_blocks,
    }


def format_report(r: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k}: {v}" for k, v in r["group_sizes"].items()) or "none"
    return "\n".join(
        [
            f"requests:               {r['requests']}",
            f"prompt tokens:          {r['prompt_tokens']}",
            f"groups:                 {r['groups']} (requests per group: {sizes}); "
            f"{r['levels']} sharing levels, nested up to {r['max_depth']} deep; "
            f"{r['ungrouped_requests']} requests share nothing",
            f"prefill tokens (plan):  {r['computed_prefill_tokens']}  "
            f"R_saving {100 * r['r_saving']:.1f}%",
            f"one-level (BatchLLM):   {r['one_level_prefill_tokens']}  "
            f"R_saving {100 * r['r_saving_one_level']:.1f}%",
            f"token-level tree:       {r['multilevel_prefill_tokens']}  "
            f"R_saving {100 * r['r_saving_multilevel']:.1f}%",
            f"LRU cache, file order:  {r['lru_prefill_tokens']}  "
            f"R_saving {100 * r['r_saving_lru_file_order']:.1f}%  "
            f"({r['lru_capacity_blocks']} blocks of {r['block_size']} tokens)",
        ]
    )
