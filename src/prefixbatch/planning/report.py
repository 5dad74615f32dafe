"""The plan report printed by ``prefixbatch plan`` before any compute.

The text form labels every figure with its ``--json`` key, followed by what it means.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np

from .one_level import one_level_prefill_tokens
from .plan import Plan, saving
from .prefix_sort import SortedPrompts
from .token_arrays import TokenArrays


def size_bucket(n: int) -> str:
    """1, 2-3, 4-7, 8-15, ...: powers of two."""
    lo = 1 << (n.bit_length() - 1)
    return str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"


def unique_tokens(lengths: np.ndarray, tree: SortedPrompts) -> int:
    """Tokens a multi-level tree computes: every distinct non-empty prefix once (the best any
    sharing can do): each sorted prompt adds what it does not share with its predecessor."""
    return int((lengths[tree.order] - tree.lcp).sum())


def tree_baselines(lengths: np.ndarray, tree: SortedPrompts, block_size: int) -> tuple[int, int]:
    """Prefill tokens of the two tree baselines the report compares the plan with: the
    token-granularity tree (every radix edge once) and BatchLLM's one-level flattening."""
    one_level = one_level_prefill_tokens(tree.order, tree.lcp, lengths, block_size)
    return unique_tokens(lengths, tree), one_level


def block_prefix_ids(
    lengths: np.ndarray, tree: SortedPrompts, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets): request ``i``'s full blocks are ``ids[offsets[i]:offsets[i + 1]]``, one
    int32 per block, equal exactly when the whole prefixes up to the end of those blocks are
    equal. Block ``j`` of sorted prompts in one run whose neighbour LCPs are all at least
    ``(j + 1) * block_size`` is one prefix; runs get consecutive ids, depth by depth."""
    blocks = lengths // block_size
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(blocks, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    pos = np.arange(len(lengths))  # sorted positions that still have a block at depth j
    next_id, j = 0, 0
    while len(pos):
        pos = pos[blocks[tree.order[pos]] > j]
        if not len(pos):
            break
        gap = np.diff(pos, prepend=-2) != 1  # a position in between ended: a new run
        starts = gap | (tree.lcp[pos] < (j + 1) * block_size)
        run = np.cumsum(starts) - 1
        ids[offsets[tree.order[pos]] + j] = next_id + run
        next_id += int(run[-1]) + 1
        j += 1
    return ids, offsets


def lru_prefill_tokens(
    prompts: TokenArrays, tree: SortedPrompts, block_size: int, capacity_blocks: int
) -> int:
    """Prefill tokens a block prefix cache with LRU eviction computes, requests in file order,
    one at a time (every request recomputes at least its last token)."""
    lengths = prompts.lengths
    ids, offsets = block_prefix_ids(lengths, tree, block_size)
    cache: OrderedDict[int, None] = OrderedDict()
    computed = 0
    for i, size in enumerate(lengths.tolist()):
        blocks = ids[offsets[i] : offsets[i + 1]].tolist()
        usable = (size - 1) // block_size
        hits = 0
        while hits < usable and blocks[hits] in cache:
            hits += 1
        computed += size - hits * block_size
        for b in blocks:
            cache[b] = None
            cache.move_to_end(b)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return computed


def count(n: int, noun: str) -> str:
    """``1 request``, ``2 requests``, ``2 prefixes``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("x", "s", "ch", "sh")) else f"{n} {noun}s"


def plan_report(
    plan: Plan,
    prompts: TokenArrays,
    tree: SortedPrompts,
    block_size: int,
    lru_capacity_blocks: int,
) -> dict[str, Any]:
    """Everything the plan decides, as one JSON-ready dict (``tree``: the prompts' sort)."""
    lru = lru_prefill_tokens(prompts, tree, block_size, lru_capacity_blocks)
    multilevel, one_level = tree_baselines(prompts.lengths, tree, block_size)
    top = plan.root.children
    sizes = Counter(size_bucket(g.size) for g in top)
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
