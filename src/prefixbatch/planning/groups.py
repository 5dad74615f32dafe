"""Groups of requests that share a block-aligned prefix, nested: system prompt > document >
question keeps all three levels instead of flattening the tree to one.

A radix node with at least two requests below it starts a new level when its depth, cut down to
whole KV blocks, reaches past the level it sits in; otherwise it merges into that level (its
tokens become part of its requests' suffixes). Each level's extension is then computed once and
shared by everything below it, so every distinct full-block prefix is prefilled exactly once.
A level left with no requests of its own and a single sub-level is replaced by that sub-level.

A request whose prompt ends exactly at its level's cut has no token of its own to compute: it
takes its first token from the logits of the level's last prefix token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .prefix_tree import Node


@dataclass(frozen=True)
class Group:
    """A level: ``prefix_len`` leading tokens (block-aligned) shared by ``members`` and by every
    request of its ``children``. The root level has ``prefix_len == 0`` (nothing shared)."""

    prefix_len: int
    members: tuple[int, ...]
    children: tuple[Group, ...] = ()

    def walk(self) -> Iterator[tuple[Group, Group | None]]:
        """Every level below and including this one, with its parent level, top-down."""
        stack: list[tuple[Group, Group | None]] = [(self, None)]
        while stack:
            g, parent = stack.pop()
            yield g, parent
            stack.extend((c, g) for c in reversed(g.children))

    def requests(self) -> list[int]:
        return [m for g, _ in self.walk() for m in g.members]


@dataclass(eq=False)
class _Level:
    cut: int
    members: list[int] = field(default_factory=list)
    children: list[_Level] = field(default_factory=list)


def build_levels(root: Node, block_size: int) -> Group:
    """The nested group tree of a radix tree (leaf counts must be filled)."""
    top = _Level(0)
    stack: list[tuple[Node, _Level]] = [(root, top)]
    while stack:
        node, level = stack.pop()
        cut = node.depth // block_size * block_size
        if node is not root and node.leaves >= 2 and cut > level.cut:
            new = _Level(cut)
            level.children.append(new)
            level = new
        level.members.extend(node.requests)
        stack.extend((c, level) for c in node.children)
    return _freeze(top)


def _freeze(level: _Level) -> Group:
    children = tuple(_freeze(c) for c in level.children)
    # A level with nothing of its own and one sub-level adds a prefix sequence and saves nothing.
    children = tuple(
        c.children[0] if not c.members and len(c.children) == 1 else c for c in children
    )
    return Group(level.cut, tuple(level.members), children)
