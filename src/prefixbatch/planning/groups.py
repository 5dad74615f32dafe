"""Groups of requests that share a block-aligned prefix, nested: system prompt > document >
question keeps all three levels instead of flattening the tree to one.

A radix node with at least two requests below it starts a new level when its depth, cut down to
whole KV blocks, reaches past the level it sits in; otherwise it merges into that level (its
tokens become part of its requests' suffixes). Each level's extension is then computed once and
shared by everything below it, so every distinct full-block prefix is prefilled exactly once.

Those levels are exactly the lcp-intervals of the block-floored LCP array (``intervals.py``): a
maximal run of sorted prompts that share at least ``v`` whole-block tokens, ``v > 0``, is one
level of prefix ``v``, and a prompt belongs to the innermost run that holds it. So the levels come
from one pass over the sorted prompts' LCPs, with one Python object per level, not per request.

A request whose prompt ends exactly at its level's cut has no token of its own to compute: it
takes its first token from the logits of the level's last prefix token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .intervals import lcp_intervals


@dataclass(frozen=True, eq=False)
class Group:
    """A level: ``prefix_len`` leading tokens (block-aligned) shared by ``members`` and by every
    request of its ``children``. The root level has ``prefix_len == 0`` (nothing shared).

    ``members``: (k,) int64 request indices, in the plan's listing order. The totals cover the
    level and everything below it: ``size`` requests, ``output_tokens`` (their ``max_tokens``)
    and ``own_tokens`` (prefill tokens computed after this level's prefix). Build with
    ``make_group``."""

    prefix_len: int
    members: np.ndarray
    children: tuple[Group, ...]
    size: int
    output_tokens: int
    own_tokens: int

    def walk(self) -> Iterator[tuple[Group, Group | None]]:
        """Every level below and including this one, with its parent level, top-down."""
        stack: list[tuple[Group, Group | None]] = [(self, None)]
        while stack:
            g, parent = stack.pop()
            yield g, parent
            stack.extend((c, g) for c in reversed(g.children))

    def requests(self) -> np.ndarray:
        """Every request index of the level and below, top-down."""
        parts = [g.members for g, _ in self.walk()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    @property
    def first(self) -> int:
        """A request of this level or below (its prompt starts with the level's prefix)."""
        g = self
        while not len(g.members):
            g = g.children[0]
        return int(g.members[0])


def make_group(
    prefix_len: int,
    members: np.ndarray,
    children: tuple[Group, ...],
    lengths: np.ndarray,
    max_tokens: np.ndarray,
) -> Group:
    """A level with its totals (``lengths`` and ``max_tokens`` of every request of the plan)."""
    members = np.asarray(members, dtype=np.int64)
    own = int(lengths[members].sum()) - prefix_len * len(members)
    own += sum(c.prefix_len - prefix_len + c.own_tokens for c in children)
    return Group(
        prefix_len,
        members,
        children,
        size=len(members) + sum(c.size for c in children),
        output_tokens=int(max_tokens[members].sum()) + sum(c.output_tokens for c in children),
        own_tokens=own,
    )


def build_levels(
    order: np.ndarray,
    lcp: np.ndarray,
    lengths: np.ndarray,
    max_tokens: np.ndarray,
    block_size: int,
) -> Group:
    """The nested group tree of prompts in sorted ``order`` with neighbour ``lcp``s
    (``prefix_sort.sort_prompts``). Members and sub-levels are listed in sorted order."""
    if not len(order):
        return make_group(0, np.zeros(0, np.int64), (), lengths, max_tokens)
    tree = lcp_intervals(lcp // block_size * block_size)
    own = tree.positions()
    children = tree.children()
    built: dict[int, Group] = {}
    for i in tree.bottom_up().tolist():
        built[i] = make_group(
            int(tree.value[i]),
            order[own[i]],
            tuple(built.pop(c) for c in children[i]),
            lengths,
            max_tokens,
        )
    return built[0]
