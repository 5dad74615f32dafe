"""The plan report printed by ``prefixbatch plan`` before any compute.

The text form labels every figure with its ``--json`` key, followed by what it means.
"""

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


def count(n: int, noun: str) -> str:
    """``1 request``, ``2 requests``, ``2 prefixes``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("x", "s", "ch", "sh")) else f"{n} {noun}s"


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_report(r: dict[str, Any]) -> str:
    """Plain words, one figure per line, each labelled with its JSON key."""
    sizes = (
        ", ".join(f"{count(v, 'group')} of {k} requests" for k, v in r["group_sizes"].items())
        or "none"
    )
    lines = [
        f"requests: {count(r['requests'], 'request')} in the plan",
        f"rejected_lines: {count(r.get('rejected_lines', 0), 'line')} left out "
        "(the run would answer them with an error record)",
        f"prompt_tokens: {r['prompt_tokens']} prompt tokens in all",
        f"groups: {count(r['groups'], 'group')} of requests that share a prefix "
        f"(group_sizes, requests per group: {sizes})",
        f"levels: {count(r['levels'], 'shared prefix')}, each computed once "
        f"(max_depth: nested up to {r['max_depth']} deep)",
        f"ungrouped_requests: {count(r['ungrouped_requests'], 'request')} that share no prefix",
        f"computed_prefill_tokens: {r['computed_prefill_tokens']} prompt tokens computed by "
        f"this plan (r_saving: {_pct(r['r_saving'])} of the prompt tokens not computed)",
        f"one_level_prefill_tokens: {r['one_level_prefill_tokens']} with BatchLLM's one-level "
        f"groups (r_saving_one_level: {_pct(r['r_saving_one_level'])})",
        f"multilevel_prefill_tokens: {r['multilevel_prefill_tokens']} if every shared token, "
        "not only whole KV blocks, were computed once "
        f"(r_saving_multilevel: {_pct(r['r_saving_multilevel'])})",
        f"lru_prefill_tokens: {r['lru_prefill_tokens']} with a prefix cache of "
        f"{r['lru_capacity_blocks']} blocks (lru_capacity_blocks) of {r['block_size']} tokens "
        "(block_size) and LRU eviction, requests in file order, one at a time "
        f"(r_saving_lru_file_order: {_pct(r['r_saving_lru_file_order'])}). This is the most "
        "--policy fcfs-lru can save: it runs up to max_num_seqs requests at once, and "
        "requests started together cannot reuse a prefix none of them has computed yet.",
    ]
    return "\n".join(lines)
