"""A compact radix tree over the token ids of a whole batch.

Built from the prompts sorted as byte strings plus the longest common prefix (LCP) of each
adjacent pair, so the cost is one sort (memcmp) and one vectorised compare per prompt, not a
Python operation per token: 100,000 prompts of 1,000 tokens build in seconds. Nodes store depths
(token counts from the root), never token copies; a node's tokens are
``prompts[node.rep][parent.depth : node.depth]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Node:
    depth: int  # tokens from the root to the end of this node's edge
    rep: int  # a request whose prompt passes through this node
    children: list[Node] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # prompts that end exactly here
    leaves: int = 0  # requests in the subtree (cached by ``count_leaves``)


def as_arrays(prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Prompts as big-endian int32 arrays, whose byte order sorts like the token order."""
    return [np.asarray(p, dtype=">i4") for p in prompts]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def build_tree(prompts: Sequence[Sequence[int]]) -> Node:
    """The compact radix tree of ``prompts``; every request index is stored at its end node."""
    arrays = as_arrays(prompts)
    order = sorted(range(len(arrays)), key=lambda i: arrays[i].tobytes())
    root = Node(depth=0, rep=order[0] if order else 0)
    stack = [root]
    prev: np.ndarray | None = None
    for i in order:
        cur = arrays[i]
        lcp = 0 if prev is None else common_prefix(prev, cur)
        popped: Node | None = None
        while stack[-1].depth > lcp:
            popped = stack.pop()
        top = stack[-1]
        if top.depth < lcp:
            # The new prompt leaves ``popped``'s edge part-way: split it at the LCP.
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
    count_leaves(root)
    return root


def postorder(root: Node) -> list[Node]:
    """Nodes children-first, iteratively (trees can be thousands of nodes deep)."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out[::-1]


def count_leaves(root: Node) -> None:
    """Fill ``leaves`` for every node in one bottom-up pass (linear, not quadratic)."""
    for node in postorder(root):
        node.leaves = len(node.requests) + sum(c.leaves for c in node.children)


def unique_tokens(root: Node) -> int:
    """Tokens a multi-level tree computes: every edge once (the best any sharing can do)."""
    total = 0
    for node in postorder(root):
        total += sum(c.depth - node.depth for c in node.children)
    return total
