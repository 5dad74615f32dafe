"""The radix tree of sorted prompts as lcp-intervals, without a node object per prompt.

Given prompts in sorted order and ``lcp[k]`` (the common prefix of sorted prompts ``k - 1`` and
``k``), every internal node of the radix tree over the prompts is an *lcp-interval*: a maximal
range of sorted positions ``lb..rb`` whose neighbouring LCPs are all at least the node's depth
``value``, one of them equal (Abouelhoda, Kurtz and Ohlebusch, "Replacing suffix trees with
enhanced suffix arrays", J. Discrete Algorithms 2004, for suffixes; the same holds for any
sorted set of strings). Intervals nest like the tree's nodes; the whole range is the root
(value 0). Each position's innermost interval is its ``owner``: the node a prompt ends at, or
whose leaf child it is.

Fed block-floored LCPs (``lcp // block_size * block_size``), the intervals are the plan's
nested levels (``groups.py``); fed the LCPs themselves, they are the token-level tree
(``one_level.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Intervals:
    """Interval ``i`` covers sorted positions ``lb[i]..rb[i]`` at depth ``value[i]``, inside
    interval ``parent[i]`` (-1 for the root, interval 0). All arrays are int64."""

    value: np.ndarray  # (intervals,)
    lb: np.ndarray
    rb: np.ndarray
    parent: np.ndarray
    owner: np.ndarray  # (positions,): the innermost interval of each sorted position

    def __len__(self) -> int:
        return len(self.value)

    def bottom_up(self) -> np.ndarray:
        """Interval ids, every child before its parent (deepest first)."""
        return np.argsort(-self.value, kind="stable")

    def children(self) -> list[list[int]]:
        """Each interval's child intervals, left to right."""
        out: list[list[int]] = [[] for _ in range(len(self))]
        for i in np.argsort(self.lb, kind="stable").tolist():
            p = int(self.parent[i])
            if p >= 0:
                out[p].append(i)
        return out

    def positions(self) -> list[np.ndarray]:
        """Each interval's own positions (those it is the innermost interval of), in order."""
        by_owner = np.argsort(self.owner, kind="stable")
        bounds = np.cumsum(np.bincount(self.owner, minlength=len(self)))
        return np.split(by_owner, bounds[:-1])


def lcp_intervals(lcp: np.ndarray) -> Intervals:
    """The lcp-interval tree of ``lcp`` ((n,) non-negative, ``lcp[0]`` ignored), n >= 1.

    One stack pass over the positions where ``lcp`` changes (where it stays equal nothing
    opens or closes), so the Python loop runs once per change, not once per prompt."""
    n = len(lcp)
    values, lbs, rbs, parents = [0], [0], [n - 1], [-1]
    stack = [0]  # open intervals, innermost last
    changes = np.flatnonzero(np.diff(lcp[1:], prepend=0)) + 1
    for k, v in zip([*changes.tolist(), n], [*lcp[changes].tolist(), 0]):
        lb, last = k - 1, -1
        while v < values[stack[-1]]:
            last = stack.pop()
            rbs[last] = k - 1
            lb = lbs[last]
            if v <= values[stack[-1]]:
                parents[last], last = stack[-1], -1
        if v > values[stack[-1]]:
            values.append(v)
            lbs.append(lb)
            rbs.append(n - 1)
            parents.append(stack[-1])
            if last >= 0:
                parents[last] = len(values) - 1
            stack.append(len(values) - 1)
    value = np.asarray(values, dtype=np.int64)
    lb = np.asarray(lbs, dtype=np.int64)
    # A position's innermost interval has depth max(lcp to its left, lcp to its right) and is
    # the one of that depth starting last at or before it (same-depth intervals are disjoint).
    left = np.concatenate([[0], lcp[1:]])
    depth = np.maximum(left, np.concatenate([lcp[1:], [0]]))
    keyed = np.lexsort((lb, value))
    keys = value[keyed] * (n + 1) + lb[keyed]
    owner = keyed[np.searchsorted(keys, depth * (n + 1) + np.arange(n), side="right") - 1]
    return Intervals(
        value, lb, np.asarray(rbs, dtype=np.int64), np.asarray(parents, dtype=np.int64), owner
    )
