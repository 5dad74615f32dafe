"""The batch plan: groups in execution order, and what sharing saves, before any compute.

``R_saving = 1 - computed prefill tokens / prompt tokens``, reported for this plan, for the best
multi-level tree (every radix-tree edge computed once) and for an LRU prefix cache fed in file
order (what a streaming engine with automatic prefix caching would reuse).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .groups import Group, plan_groups
from .prefix_tree import build_tree, unique_tokens


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]  # execution order: decode ratio, highest first
    prompt_tokens: int
    computed_prefill_tokens: int
    multilevel_prefill_tokens: int

    @property
    def r_saving(self) -> float:
        return saving(self.computed_prefill_tokens, self.prompt_tokens)

    @property
    def r_saving_multilevel(self) -> float:
        return saving(self.multilevel_prefill_tokens, self.prompt_tokens)

    @property
    def shared_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prefix_len > 0]


def saving(computed: int, total: int) -> float:
    return 1 - computed / total if total else 0.0


def group_prefill(group: Group, lengths: Sequence[int]) -> int:
    """Prefill tokens a group computes: its prefix once plus every member's own suffix."""
    return group.prefix_len + sum(lengths[m] - group.prefix_len for m in group.members)


def make_plan(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int],
              block_size: int) -> Plan:
    """Build the radix tree, flatten it to groups and order them by decode ratio."""
    lengths = [len(p) for p in prompts]
    if not prompts:
        return Plan((), 0, 0, 0)
    root = build_tree(prompts)
    groups = plan_groups(root, lengths, block_size)

    def decode_ratio(g: Group) -> float:
        return sum(max_tokens[m] for m in g.members) / max(1, group_prefill(g, lengths))

    ordered = sorted(groups, key=decode_ratio, reverse=True)
    return Plan(
        groups=tuple(ordered),
        prompt_tokens=sum(lengths),
        computed_prefill_tokens=sum(group_prefill(g, lengths) for g in groups),
        multilevel_prefill_tokens=unique_tokens(root),
    )


def lru_prefill_tokens(prompts: Sequence[Sequence[int]], block_size: int,
                       capacity_blocks: int) -> int:
    """Prefill tokens a block-hash prefix cache with LRU eviction computes, requests in file
    order, one at a time (every request recomputes at least its last token)."""
    cache: OrderedDict[int, None] = OrderedDict()
    computed = 0
    for prompt in prompts:
        hashes, parent = [], None
        for i in range(len(prompt) // block_size):
            parent = hash((parent, tuple(prompt[i * block_size : (i + 1) * block_size])))
            hashes.append(parent)
        usable = (len(prompt) - 1) // block_size
        hits = 0
        while hits < usable and hashes[hits] in cache:
            hits += 1
        computed += len(prompt) - hits * block_size
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return computed
