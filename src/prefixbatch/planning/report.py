"""The plan report printed by ``prefixbatch plan`` before any compute."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .plan import Plan, lru_prefill_tokens, saving


def size_bucket(n: int) -> str:
    """1, 2-3, 4-7, 8-15, ...: powers of two."""
    lo = 1 << (n.bit_length() - 1)
    return str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"


def plan_report(plan: Plan, prompts: Sequence[Sequence[int]], block_size: int,
                lru_capacity_blocks: int) -> dict[str, Any]:
    """Everything the plan decides, as one JSON-ready dict."""
    lru = lru_prefill_tokens(prompts, block_size, lru_capacity_blocks)
    sizes = Counter(size_bucket(len(g.members)) for g in plan.shared_groups)
    return {
        "requests": len(prompts),
        "prompt_tokens": plan.prompt_tokens,
        "groups": len(plan.shared_groups),
        "ungrouped_requests": sum(len(g.members) for g in plan.groups if not g.prefix_len),
        "group_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "block_size": block_size,
        "computed_prefill_tokens": plan.computed_prefill_tokens,
        "r_saving": round(plan.r_saving, 6),
        "multilevel_prefill_tokens": plan.multilevel_prefill_tokens,
        "r_saving_multilevel": round(plan.r_saving_multilevel, 6),
        "lru_prefill_tokens": lru,
        "r_saving_lru_file_order": round(saving(lru, plan.prompt_tokens), 6),
        "lru_capacity_blocks": lru_capacity_blocks,
    }


def format_report(r: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k}: {v}" for k, v in r["group_sizes"].items()) or "none"
    return "\n".join([
        f"requests:               {r['requests']}",
        f"prompt tokens:          {r['prompt_tokens']}",
        f"groups:                 {r['groups']} (members per group: {sizes}); "
        f"{r['ungrouped_requests']} requests share nothing",
        f"prefill tokens (plan):  {r['computed_prefill_tokens']}  "
        f"R_saving {100 * r['r_saving']:.1f}%",
        f"best multi-level tree:  {r['multilevel_prefill_tokens']}  "
        f"R_saving {100 * r['r_saving_multilevel']:.1f}%",
        f"LRU cache, file order:  {r['lru_prefill_tokens']}  "
        f"R_saving {100 * r['r_saving_lru_file_order']:.1f}%  "
        f"({r['lru_capacity_blocks']} blocks of {r['block_size']} tokens)",
    ])
