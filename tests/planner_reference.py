"""The planner as it was before the compact (array) planner, kept as the tests' oracle: a node
object per radix-tree node, the prompts sorted as byte strings, levels and BatchLLM's one-level
flattening by walking the nodes, the LRU cache simulated with hashes of token tuples. Slow and
memory-hungry, and simple enough to trust."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Node:
    depth: int
    rep: int
    children: list[Node] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    leaves: int = 0


def build_tree(prompts: Sequence[Sequence[int]]) -> Node:
    arrays = [np.asarray(p, dtype=">i4") for p in prompts]
    order = sorted(range(len(arrays)), key=lambda i: arrays[i].tobytes())
    root = Node(depth=0, rep=order[0] if order else 0)
    stack = [root]
    prev: np.ndarray | None = None
    for i in order:
        cur = arrays[i]
        lcp = 0
        if prev is not None:
            m = min(len(prev), len(cur))
            diff = np.flatnonzero(prev[:m] != cur[:m])
            lcp = int(diff[0]) if len(diff) else m
        popped: Node | None = None
        while stack[-1].depth > lcp:
            popped = stack.pop()
        top = stack[-1]
        if top.depth < lcp:
            assert popped is not None
            mid = Node(depth=lcp, rep=popped.rep, children=[popped])
            top.children[top.children.index(popped)] = mid
            stack.append(mid)
            top = mid
        if top.depth == len(cur):
            top.requests.append(i)
        else:
            leaf = Node(depth=len(cur), rep=i, requests=[i])
            top.children.append(leaf)
            stack.append(leaf)
        prev = cur
    for node in postorder(root):
        node.leaves = len(node.requests) + sum(c.leaves for c in node.children)
    return root


def postorder(root: Node) -> list[Node]:
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out[::-1]


def unique_tokens(root: Node) -> int:
    return sum(c.depth - n.depth for n in postorder(root) for c in n.children)


@dataclass(eq=False)
class Level:
    cut: int
    members: list[int] = field(default_factory=list)
    children: list[Level] = field(default_factory=list)


def build_levels(root: Node, block_size: int) -> Level:
    top = Level(0)
    stack: list[tuple[Node, Level]] = [(root, top)]
    while stack:
        node, level = stack.pop()
        cut = node.depth // block_size * block_size
        if node is not root and node.leaves >= 2 and cut > level.cut:
            new = Level(cut)
            level.children.append(new)
            level = new
        level.members.extend(node.requests)
        stack.extend((c, level) for c in node.children)
    return _freeze(top)


def _freeze(level: Level) -> Level:
    children = [_freeze(c) for c in level.children]
    children = [c.children[0] if not c.members and len(c.children) == 1 else c for c in children]
    return Level(level.cut, level.members, children)


def canonical(level: Level) -> tuple:  # type: ignore[type-arg]
    """A level tree in a form that ignores listing order."""
    kids = sorted(canonical(c) for c in level.children)
    return (level.cut, tuple(sorted(level.members)), tuple(kids))


def computed_tokens(level: Level, lengths: Sequence[int], base: int = 0) -> int:
    total = level.cut - base + sum(lengths[m] - level.cut for m in level.members)
    return total + sum(computed_tokens(c, lengths, level.cut) for c in level.children)


def flatten(root: Node) -> list[tuple[int, list[int]]]:
    below: dict[int, list[tuple[int, list[int]]]] = {}
    for node in postorder(root):
        hanging: list[tuple[int, list[int]]] = []
        for c in node.children:
            depth, members = c.depth, list(c.requests)
            edge = c.depth - node.depth
            collapsed = []
            for d, m in below.pop(id(c), []):
                if (len(m) - 1) * (d - c.depth) - edge > 0:
                    hanging.append((d, m))
                else:
                    collapsed.append((d, m))
            for _, m in collapsed:
                members += m
            if len(collapsed) == 1 and not c.requests:
                depth = collapsed[0][0]
            if members:
                hanging.append((depth, members))
        below[id(node)] = hanging
    return below.pop(id(root), []) + ([(0, list(root.requests))] if root.requests else [])


def one_level_prefill_tokens(root: Node, lengths: Sequence[int], block_size: int) -> int:
    total = 0
    for depth, members in flatten(root):
        shortest = min(lengths[m] for m in members)
        prefix = min(depth, shortest - 1) // block_size * block_size if len(members) > 1 else 0
        total += prefix + sum(lengths[m] - prefix for m in members)
    return total


def lru_prefill_tokens(
    prompts: Sequence[Sequence[int]], block_size: int, capacity_blocks: int
) -> int:
    cache: OrderedDict[tuple[int, ...], None] = OrderedDict()
    computed = 0
    for prompt in prompts:
        keys = [tuple(prompt[: (i + 1) * block_size]) for i in range(len(prompt) // block_size)]
        usable = (len(prompt) - 1) // block_size
        hits = 0
        while hits < usable and keys[hits] in cache:
            hits += 1
        computed += len(prompt) - hits * block_size
        for k in keys:
            cache[k] = None
            cache.move_to_end(k)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return computed
