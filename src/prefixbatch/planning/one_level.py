"""BatchLLM's one-level flattening, kept as the baseline the plan report compares against.

The rule, applied bottom-up over the token-level radix tree: below a node ``n``, a child ``c``
has been reduced to groups that hang under it; such a group ``g`` is lifted to hang under ``n``
directly (its prefix becomes ``c + g``) when that saves prefill tokens:
``(leaves(g) - 1) * len(g) - len(c) > 0``. Otherwise ``g`` collapses into ``c``: its tokens
become part of its members' suffixes. A group left with members from a single collapsed child
keeps that child's longer prefix (single-child merge).

The tree is the lcp-interval tree of the sorted prompts (``intervals.py``); a group is kept as
its depth and the count, shortest and total length of its members, which is all the prefill
count needs. A group of one request never lifts (its gain is ``-len(c)``), so those are summed
into one aggregate per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intervals import lcp_intervals


@dataclass
class Members:
    """The count, shortest and total prompt length of a group's requests."""

    count: int = 0
    shortest: int = 1 << 62
    total: int = 0

    def add(self, other: Members) -> None:
        self.count += other.count
        self.shortest = min(self.shortest, other.shortest)
        self.total += other.total


@dataclass
class Hanging:
    """The groups hanging under a node: those of two or more requests (depth, members), and
    the single requests, summed."""

    groups: list[tuple[int, Members]]
    singles: Members


def flatten(
    order: np.ndarray, lcp: np.ndarray, lengths: np.ndarray
) -> tuple[list[tuple[int, Members]], Members]:
    """The one-level tree of prompts in sorted ``order`` with neighbour ``lcp``s: (prefix
    depth, members) per group of two or more requests, and the requests left alone, summed."""
    if not len(order):
        return [], Members()
    tree = lcp_intervals(lcp)
    sizes = lengths[order]
    # Each interval's own positions: prompts ending at the node, or leaves below it.
    ends = sizes == tree.value[tree.owner]
    ending = np.bincount(tree.owner[ends], minlength=len(tree))
    leaf = tree.owner[~ends]
    leaf_count = np.bincount(leaf, minlength=len(tree))
    leaf_total = np.bincount(leaf, weights=sizes[~ends], minlength=len(tree)).astype(np.int64)
    leaf_short = np.full(len(tree), 1 << 62, dtype=np.int64)
    np.minimum.at(leaf_short, leaf, sizes[~ends])
    children = tree.children()
    below: dict[int, Hanging] = {}
    for n in tree.bottom_up().tolist():
        leaves = Members(int(leaf_count[n]), int(leaf_short[n]), int(leaf_total[n]))
        hanging = Hanging([], leaves)  # each leaf child hangs as a group of one
        for c in children[n]:
            depth, count = int(tree.value[c]), int(ending[c])
            own = Members(count, depth, depth * count) if count else Members()
            edge = depth - int(tree.value[n])
            sub = below.pop(c)
            own.add(sub.singles)  # a group of one never lifts: its gain is -edge
            collapsed, last_depth = sub.singles.count, -1
            for d, g in sub.groups:
                if (g.count - 1) * (d - depth) - edge > 0:
                    hanging.groups.append((d, g))
                else:
                    own.add(g)
                    collapsed, last_depth = collapsed + 1, d
            if collapsed == 1 and last_depth >= 0 and not count:
                depth = last_depth  # every member also shares the collapsed prefix
            if own.count > 1:
                hanging.groups.append((depth, own))
            else:
                hanging.singles.add(own)
        below[n] = hanging
    root = below.pop(0)
    if ending[0]:  # empty prompts end at the root; they compute nothing
        root.singles.add(Members(int(ending[0]), 0, 0))
    return root.groups, root.singles


def one_level_prefill_tokens(
    order: np.ndarray, lcp: np.ndarray, lengths: np.ndarray, block_size: int
) -> int:
    """Prefill tokens of the one-level plan with prefixes cut to whole blocks (every member
    keeps at least one token of its own, as BatchLLM requires)."""
    groups, singles = flatten(order, lcp, lengths)
    total = singles.total
    for depth, m in groups:
        prefix = min(depth, m.shortest - 1) // block_size * block_size
        total += prefix + m.total - m.count * prefix
    return total
