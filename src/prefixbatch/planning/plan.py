"""The batch plan: nested groups in execution order, and what sharing saves, before any compute.

``R_saving = 1 - computed prefill tokens / prompt tokens``. The plan is made once per job (by the
job, the Python API or the Ray driver) and handed down to the scheduler; a Ray worker gets its
share of the driver's plan (``Plan.subset``). The comparison figures of the plan report (the
token-level tree, BatchLLM's one-level flattening, an LRU prefix cache in file order) are computed
only for the report (``report.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .block_hash import chain_hashes
from .groups import Group, build_levels
from .prefix_tree import build_tree


@dataclass(frozen=True)
class Plan:
    root: Group  # prefix_len 0: its members share nothing, its children are the top levels
    lengths: tuple[int, ...]
    max_tokens: tuple[int, ...]
    prompt_tokens: int
    computed_prefill_tokens: int

    @property
    def r_saving(self) -> float:
        return saving(self.computed_prefill_tokens, self.prompt_tokens)

    def subset(self, indices: Sequence[int]) -> Plan:
        """The plan of requests ``indices`` alone, renumbered ``0..len(indices)-1`` in that
        order: every level keeps its prefix; a level left with fewer than two requests hands
        them to its parent level, and a level with nothing of its own and a single sub-level is
        replaced by it (as when planning)."""
        new = {old: i for i, old in enumerate(indices)}
        root = _restrict(self.root, new) or Group(0, ())
        lengths = tuple(self.lengths[i] for i in indices)
        return Plan(
            root=root,
            lengths=lengths,
            max_tokens=tuple(self.max_tokens[i] for i in indices),
            prompt_tokens=sum(lengths),
            computed_prefill_tokens=computed_tokens(root, lengths),
        )

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


def _restrict(g: Group, new: dict[int, int]) -> Group | None:
    """``g`` with only the requests in ``new`` (renumbered); None when none is left."""
    members = [new[m] for m in g.members if m in new]
    children: list[Group] = []
    for c in g.children:
        sub = _restrict(c, new)
        if sub is None:
            continue
        if len(sub.requests()) < 2:  # nothing left to share at this level
            members += sub.requests()
        elif not sub.members and len(sub.children) == 1:
            children.append(sub.children[0])
        else:
            children.append(sub)
    if not members and not children:
        return None
    return Group(g.prefix_len, tuple(members), tuple(children))


def make_plan(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int], block_size: int) -> Plan:
    """Build the radix tree and cut it into nested block-aligned groups."""
    lengths = [len(p) for p in prompts]
    if not prompts:
        return Plan(Group(0, ()), (), (), 0, 0)
    root = build_levels(build_tree(prompts), block_size)
    return Plan(
        root=root,
        lengths=tuple(lengths),
        max_tokens=tuple(max_tokens),
        prompt_tokens=sum(lengths),
        computed_prefill_tokens=computed_tokens(root, lengths),
    )


def lru_prefill_tokens(
    prompts: Sequence[Sequence[int]], block_size: int, capacity_blocks: int
) -> int:
    """Prefill tokens a block-hash prefix cache with LRU eviction computes, requests in file
    order, one at a time (every request recomputes at least its last token)."""
    cache: OrderedDict[int, None] = OrderedDict()
    computed = 0
    for prompt in prompts:
        hashes = chain_hashes(prompt, block_size)
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
