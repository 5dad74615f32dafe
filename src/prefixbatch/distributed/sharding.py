"""Split a planned batch into work units that never split a prefix group, and balance them.

A unit is one top-level group of the plan (with everything nested below it) or one request that
shares nothing. Its cost is the prefill tokens it computes after sharing plus the decode tokens
it may produce. A group too big for one worker's share (a system prompt above every request of
the job) is split into its sub-groups and members: each worker that gets part of it computes its
prefix once more, the sub-groups stay whole. Units are packed into chunks largest first
(longest-processing-time first), so that workers can pull chunks as they free up: fast workers
take more.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from ..planning.groups import Group
from ..planning.plan import Plan, computed_tokens


@dataclass(frozen=True)
class Unit:
    requests: tuple[int, ...]
    cost: float


def plan_units(plan: Plan, workers: int = 1) -> list[Unit]:
    """Units of whole groups, splitting only groups that cost more than one worker's share."""

    def decode(reqs: Sequence[int]) -> int:
        return sum(plan.max_tokens[m] for m in reqs)

    total = computed_tokens(plan.root, plan.lengths) + decode(range(len(plan.lengths)))
    limit = total / workers
    units = [Unit((m,), plan.lengths[m] + plan.max_tokens[m]) for m in plan.root.members]
    stack: list[tuple[Group, int]] = [(g, 0) for g in plan.root.children]
    while stack:
        g, base = stack.pop()  # base: prefix tokens already computed above g's parent
        reqs = g.requests()
        cost = computed_tokens(g, plan.lengths, base) + decode(reqs)
        if cost <= limit or len(g.children) + len(g.members) < 2:
            units.append(Unit(tuple(reqs), cost))
            continue
        # Too big for one worker: its parts become units, each recomputing g's prefix.
        stack += [(c, base) for c in g.children]
        units += [Unit((m,), plan.lengths[m] - base + plan.max_tokens[m]) for m in g.members]
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
