"""BatchLLM's one-level flattening, kept as the baseline the plan report compares against.

The rule, applied bottom-up: below a node ``n``, a child ``c`` has been reduced to groups that
hang under it; such a group ``g`` is lifted to hang under ``n`` directly (its prefix becomes
``c + g``) when that saves prefill tokens: ``(leaves(g) - 1) * len(g) - len(c) > 0``. Otherwise
``g`` collapses into ``c``: its tokens become part of its members' suffixes. A group left with
members from a single collapsed child keeps that child's longer prefix (single-child merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .prefix_tree import Node, postorder


@dataclass
class _Pending:
    depth: int  # absolute end of the shared prefix
    members: list[int]


def flatten(root: Node) -> list[tuple[int, list[int]]]:
    """(prefix depth, member request indices) per group of the one-level tree."""
    below: dict[int, list[_Pending]] = {}  # id(node) -> groups hanging directly under it
    for node in postorder(root):
        hanging: list[_Pending] = []
        for c in node.children:
            own = _Pending(c.depth, list(c.requests))
            edge = c.depth - node.depth
            collapsed: list[_Pending] = []
            for g in below.pop(id(c), []):
                if (len(g.members) - 1) * (g.depth - c.depth) - edge > 0:
                    hanging.append(g)
                else:
                    collapsed.append(g)
            for g in collapsed:
                own.members += g.members
            if len(collapsed) == 1 and not c.requests:
                own.depth = collapsed[0].depth  # every member also shares the collapsed prefix
            if own.members:
                hanging.append(own)
        below[id(node)] = hanging
    return [(g.depth, g.members) for g in below.pop(id(root), [])] + (
        [(0, list(root.requests))] if root.requests else []
    )


def one_level_prefill_tokens(root: Node, lengths: Sequence[int], block_size: int) -> int:
    """Prefill tokens of the one-level plan with prefixes cut to whole blocks (every member
    keeps at least one token of its own, as BatchLLM requires)."""
    total = 0
    for depth, members in flatten(root):
        shortest = min(lengths[m] for m in members)
        prefix = min(depth, shortest - 1) // block_size * block_size if len(members) > 1 else 0
        total += prefix + sum(lengths[m] - prefix for m in members)
    return total
