"""The batch plan: nested groups in execution order, and what sharing saves, before any compute.

``R_saving = 1 - computed prefill tokens / prompt tokens``, reported for this plan, for the best
token-granularity tree (every radix-tree edge computed once), for BatchLLM's one-level flattening
and for an LRU prefix cache fed in file order (what a streaming engine with automatic prefix
caching reuses).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .groups import Group, build_levels
from .one_level import one_level_prefill_tokens
from .prefix_tree import build_tree, unique_tokens


@dataclass(frozen=True)
class Plan:
    root: Group  # prefix_len 0: its members share nothing, its children are the top levels
    lengths: tuple[int, ...]
    max_tokens: tuple[int, ...]
    prompt_tokens: int
    computed_prefill_tokens: int
    multilevel_prefill_tokens: int  # token-granularity tree: every radix edge once
    one_level_prefill_tokens: int  # BatchLLM's one-level flattening (gain rule), for comparison

    @property
    def r_saving(self) -> float:
        return saving(self.computed_prefill_tokens, self.prompt_tokens)

    @property
    def r_saving_multilevel(self) -> float:
        return saving(self.multilevel_prefill_tokens, self.prompt_tokens)

    def decode_ratio(self, item: int | Group, base: int) -> float:
        """Expected output tokens / prefill tokens computed, for a request or a level below a
        prefix of ``base`` tokens."""
        if isinstance(item, int):
            return self.max_tokens[item] / max(1, self.lengths[item] - base)
        out = sum(self.max_tokens[m] for m in item.requests())
        return out / max(1, computed_tokens(item, self.lengths, base))

    def in_order(self, level: Group) -> list[int | Group]:
        """A level's members and sub-levels, highest decode ratio first, so that decode-heavy
        work starts early and overlaps the prefill of what follows."""
        items: list[int | Group] = [*level.members, *level.children]
        return sorted(items, key=lambda i: self.decode_ratio(i, level.prefix_len), reverse=True)

    @property
    def shared_groups(self) -> list[Group]:
        """Every level that shares a prefix (all but the root)."""
        return [g for g, parent in self.root.walk() if parent is not None]


def saving(computed: int, total: int) -> float:
    return 1 - computed / total if total else 0.0


def computed_tokens(top: Group, lengths: Sequence[int], base: int = 0) -> int:
    """Each level's extension once, plus every request's tokens after its level's prefix.
    ``base`` is the prefix length already computed above ``top``."""
    total = 0
    for g, parent in top.walk():
        total += g.prefix_len - (parent.prefix_len if parent else base)
        total += sum(lengths[m] - g.prefix_len for m in g.members)
    return total


def make_plan(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], block_size: int) -> Plan:
    """Build the radix tree and cut it into nested block-aligned groups."""
    lengths = [len(p) for p in prompts]
    if not prompts:
        return Plan(Group(0, ()), (), (), 0, 0, 0, 0)
    tree = build_tree(prompts)
    root = build_levels(tree, block_size)
    return Plan(
        root=root,
        lengths=tuple(lengths),
        max_tokens=tuple(max_tokens),
        prompt_tokens=sum(lengths),
        computed_prefill_tokens=computed_tokens(root, lengths),
        multilevel_prefill_tokens=unique_tokens(tree),
        one_level_prefill_tokens=one_level_prefill_tokens(tree, lengths, block_size),
    )


def lru_prefill_tokens(
    prompts: Sequence[Sequence[int]], block_size: int, capacity_blocks: int
) -> int:
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
