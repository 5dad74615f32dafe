"""Turn requests into scheduler sequences in the order a policy wants, one request at a time.

``fcfs`` and ``fcfs-lru``: the requests in input order. ``batchllm``: the plan's nested groups in
decode-ratio order; every level becomes a leader sequence that computes its prefix (sampling
nothing itself, or the first token of members whose prompt is exactly the prefix), followed by
its members and sub-levels, which reference it. The plan is made before (by the job, the API or
the Ray driver), never here.

``WorkStream`` walks that order lazily: the engine takes the next sequences only as the
scheduler's queue runs low, so a batch of a million requests holds a ``Request`` and its
``Sequence`` objects only for the few thousand near the front. A level's leader comes before
its members, in one ``Admission`` with the members whose prompt is exactly the prefix (the
leader samples their first token when its prefix is done, so they must exist by then).

A request with ``n > 1`` becomes ``n`` choice sequences under every policy. Their prompt is a
level of its own, cut to whole KV blocks (a block is written by one sequence only): computed
once by a leader, shared by the choices, freed when the last one ends. Each choice recomputes
the prompt's last partial block itself (fewer than ``block_size`` tokens); a block-aligned
prompt is computed exactly once and the choices take their first tokens from its last logits.
Requests that ask for prompt log-probabilities compute their whole prompt themselves (a shared
prefix has no logits for them), outside any level, after everything else.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from ..outputs import Request
from ..planning.groups import Group
from ..planning.plan import Plan
from ..policy import Policy
from .request_source import RequestSource
from .sequence import PrefixGroup, Sequence, as_prompt

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's stream increment (execution/sampler.py)

# What the engine adds to the scheduler at once: requests (with their positions in the source)
# and sequences (a level's leader first, then its requests' sequences).
Admission = tuple[list[tuple[int, Request]], list[Sequence]]


def request_seed(request: Request, job_seed: int) -> int:
    """The request's sampling seed: its own, or derived from the job's seed and its index (so a
    request samples the same tokens whatever shares its batch)."""
    if request.params.seed is not None:
        return request.params.seed
    return job_seed * 1_000_003 + request.index


def choice_seed(seed: int, choice: int) -> int:
    """Choice 0 keeps the request's seed; choice ``i`` starts ``i`` golden-gamma steps further
    (mod 2^64), a stream of its own that the sampler's hash mixes like any seed, so a seeded
    choice is reproducible in any batch."""
    return seed if choice == 0 else (seed + choice * _GOLDEN_GAMMA) % (1 << 64)


class WorkStream:
    """The sequences of one batch, made on demand; iterate it for ``Admission``s.

    A planning policy needs the batch's ``plan`` (its indices are positions in ``source``);
    group ids come from ``group_ids`` (shared by an engine's batches: they must be unique
    among its live levels). Raises ValueError when a planning policy gets no plan or a plan of
    another batch."""

    def __init__(
        self,
        source: RequestSource,
        policy: Policy | str,
        block_size: int,
        seed: int,
        plan: Plan | None = None,
        group_ids: Iterator[int] | None = None,
    ) -> None:
        self.source, self.block_size, self.seed = source, block_size, seed
        self.plans = Policy.parse(policy).plans
        if self.plans and (plan is None or len(plan.lengths) != len(source)):
            raise ValueError("the batchllm policy needs the plan of exactly these requests")
        self.plan = plan if self.plans else None
        self.group_ids = itertools.count() if group_ids is None else group_ids
        self._items = self._generate()

    def __iter__(self) -> Iterator[Admission]:
        return self._items

    def _generate(self) -> Iterator[Admission]:
        n = len(self.source)
        if self.plan is None:
            for pos in range(n):
                yield self._request(pos, None)
            return
        scoring = [p for p in range(n) if self.source.params(p).prompt_logprobs is not None]
        positions = np.arange(n)
        if scoring:  # outside every level: their prompt's logits are needed
            positions = np.setdiff1d(positions, scoring)
            self.plan = self.plan.subset(positions)
        yield from self._levels(self.plan, positions)
        for pos in scoring:
            yield self._request(pos, None)

    def _levels(self, plan: Plan, positions: np.ndarray) -> Iterator[Admission]:
        """The plan's levels depth first, each level's items in decode-ratio order (a
        sub-level: its leader, then its contents)."""
        stack: list[tuple[Iterator[int | Group], PrefixGroup | None, int]] = [
            (plan.in_order(plan.root), None, 0)
        ]
        while stack:
            items, group, prefix_len = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
            elif isinstance(item, int):
                if group is None or plan.lengths[item] != prefix_len:  # not emitted already
                    yield self._request(int(positions[item]), group)
            else:
                first = self.source.request(int(positions[item.first]))
                tokens = as_prompt(first.prompt_token_ids)[: item.prefix_len]
                sub = self._open_level(tokens, len(item.members) + len(item.children), group)
                requests, seqs = [], [self._leader(sub, group, first)]
                exact = item.members[plan.lengths[item.members] == item.prefix_len]
                for m in exact.tolist():  # the leader samples their first token
                    more, choices = self._request(int(positions[m]), sub)
                    requests += more
                    seqs += choices
                yield requests, seqs
                stack.append((plan.in_order(item), sub, item.prefix_len))

    def _open_level(
        self, tokens: np.ndarray, remaining: int, parent: PrefixGroup | None
    ) -> PrefixGroup:
        return PrefixGroup(next(self.group_ids), tokens, remaining, parent=parent)

    def _leader(self, level: PrefixGroup, parent: PrefixGroup | None, first: Request) -> Sequence:
        """The sequence that computes ``level``'s prefix (queued before its members)."""
        tokens = level.tokens
        leader = Sequence(
            -1 - level.group_id, tokens, len(tokens), first.params, group=parent, leads=level
        )
        level.leader = leader
        return leader

    def _request(self, pos: int, group: PrefixGroup | None) -> Admission:
        """A request's sequences below ``group``, which counts the request once."""
        r = self.source.request(pos)
        # One int32 array for the request and its sequences (a view of the source's where it
        # holds one): no int object per token, nothing for the garbage collector to walk.
        prompt = as_prompt(r.prompt_token_ids)
        r = Request(r.index, prompt, r.params)
        n = r.params.n
        seqs: list[Sequence] = []
        if n > 1:
            aligned = len(prompt) // self.block_size * self.block_size
            above = len(group.tokens) if group is not None else 0
            if aligned > above and r.params.prompt_logprobs is None:
                level = self._open_level(prompt[:aligned], n, group)
                seqs.append(self._leader(level, group, r))
                group = level
            elif group is not None:
                group.remaining += n - 1  # the choices are members of the enclosing level
        seed = request_seed(r, self.seed)
        for choice in range(n):
            seq = Sequence(
                r.index,
                prompt,
                len(prompt),
                r.params,
                group=group,
                seed=choice_seed(seed, choice),
                choice=choice,
            )
            if group is not None and seq.num_prompt == len(group.tokens):
                group.dependents.append(seq)
            seqs.append(seq)
        return [(pos, r)], seqs
