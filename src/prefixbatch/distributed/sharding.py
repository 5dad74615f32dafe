"""Split a planned batch into work units that never split a prefix group, and balance them.

A unit is one top-level group of the plan (with everything nested below it), or a run of
requests that share nothing (packed in plan order up to a small cost, so a million loose
requests make a few hundred units, not a million). Its cost is the prefill tokens it computes
after sharing plus the decode tokens it may produce. A group too big for one worker's share (a
system prompt above every request of the job) is split into its sub-groups and runs of its
members: each worker that gets part of it computes its prefix once more, the sub-groups stay
whole. Units are packed into chunks largest first (longest-processing-time first), so that
workers can pull chunks as they free up: fast workers take more.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..planning.groups import Group
from ..planning.plan import Plan, computed_tokens

PIECES = 64  # loose requests are packed into units of about 1/PIECES of a worker's share


@dataclass(frozen=True, eq=False)
class Unit:
    requests: np.ndarray  # (k,) int64 request indices of the plan
    cost: float


def _runs(members: np.ndarray, costs: np.ndarray, prefix: int, piece: float) -> list[Unit]:
    """``members`` in order, cut into units of about ``piece`` cost; each unit computes the
    ``prefix`` tokens above them once more."""
    if not len(members):
        return []
    cut = np.searchsorted(np.cumsum(costs), np.arange(piece, costs.sum(), piece), "right")
    bounds = [0, *sorted(set(cut.tolist()) - {0, len(members)}), len(members)]
    return [
        Unit(members[a:b], prefix + float(costs[a:b].sum())) for a, b in zip(bounds, bounds[1:])
    ]


def plan_units(plan: Plan, workers: int = 1) -> list[Unit]:
    """Units of whole groups, splitting only groups that cost more than one worker's share."""
    total = computed_tokens(plan.root) + int(plan.max_tokens.sum())
    limit = total / workers
    piece = max(1.0, limit / PIECES)

    def own(g: Group) -> np.ndarray:
        return (plan.lengths[g.members] - g.prefix_len + plan.max_tokens[g.members]).astype(float)

    units = _runs(plan.root.members, own(plan.root), 0, piece)
    stack: list[tuple[Group, int]] = [(g, 0) for g in plan.root.children]
    while stack:
        g, base = stack.pop()  # base: prefix tokens already computed above g's parent
        cost = computed_tokens(g, base) + g.output_tokens
        if cost <= limit or len(g.children) + len(g.members) < 2:
            units.append(Unit(g.requests(), cost))
            continue
        # Too big for one worker: its parts become units, each recomputing g's prefix.
        stack += [(c, base) for c in g.children]
        units += _runs(g.members, own(g), g.prefix_len - base, piece)
    return units


def lpt_assign(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Static longest-processing-time-first assignment: each unit, largest first, goes to the
    least loaded worker. Max load <= mean load + the largest unit's cost."""
    heap = [(0.0, w) for w in range(workers)]
    out: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        load, w = heapq.heappop(heap)
        out[w].append(i)
        heapq.heappush(heap, (load + costs[i], w))
    return out


def make_chunks(units: Sequence[Unit], workers: int, per_worker: int = 4) -> list[list[Unit]]:
    """Chunks for the driver's queue, largest units first, with guided sizes: each chunk takes
    about remaining / (2 * workers) cost, never less than total / (workers * per_worker * 4), so
    early chunks are big (little overhead) and the last ones small (workers finish together).
    A unit larger than its chunk's target is a chunk of its own."""
    if not units:
        return []
    ordered = sorted(units, key=lambda u: -u.cost)
    remaining = sum(u.cost for u in ordered)
    floor = remaining / (workers * per_worker * 4)
    chunks: list[list[Unit]] = []
    current: list[Unit] = []
    load = 0.0
    target = max(floor, remaining / (2 * workers))
    for u in ordered:
        if current and load + u.cost > target:
            chunks.append(current)
            remaining -= load
            current, load = [], 0.0
            target = max(floor, remaining / (2 * workers))
        current.append(u)
        load += u.cost
    chunks.append(current)
    return chunks
