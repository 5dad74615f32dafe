"""Turn requests into scheduler sequences in the order a policy wants.

``fcfs`` and ``fcfs-lru``: the requests in input order. ``batchllm``: the plan's nested groups in
decode-ratio order; every level becomes a leader sequence that computes its prefix (sampling
nothing itself, or the first token of members whose prompt is exactly the prefix), followed by
its members and sub-levels, which reference it. The plan is made before (by the job, the API or
the Ray driver), never here.

A request with ``n > 1`` becomes ``n`` choice sequences under every policy. Their prompt is a
level of its own, cut to whole KV blocks (a block is written by one sequence only): computed
once by a leader, shared by the choices, freed when the last one ends. Each choice recomputes
the prompt's last partial block itself (fewer than ``block_size`` tokens); a block-aligned
prompt is computed exactly once and the choices take their first tokens from its last logits.
Requests that ask for prompt log-probabilities compute their whole prompt themselves (a shared
prefix has no logits for them), outside any level.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from ..outputs import Request
from ..planning.groups import Group
from ..planning.plan import Plan
from ..policy import Policy
from .sequence import PrefixGroup, Sequence

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's stream increment (execution/sampler.py)


@dataclass
class Work:
    sequences: list[Sequence]
    requests: dict[int, Request]  # seq_id -> request
    block_size: int
    seed: int
    plan: Plan | None = None
    groups: list[PrefixGroup] = field(default_factory=list)
    first_group_id: int = 0


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


def _sequence(r: Request, seed: int, group: PrefixGroup | None, choice: int) -> Sequence:
    seq = Sequence(
        r.index,
        list(r.prompt_token_ids),
        len(r.prompt_token_ids),
        r.params,
        group=group,
        seed=choice_seed(seed, choice),
        choice=choice,
    )
    if group is not None and seq.num_prompt == len(group.tokens):
        group.dependents.append(seq)
    return seq


def _open_level(
    work: Work, tokens: list[int], remaining: int, parent: PrefixGroup | None, first: Request
) -> PrefixGroup:
    """A new level below ``parent`` and its leader sequence (queued now, before its members)."""
    level = PrefixGroup(work.first_group_id + len(work.groups), tokens, remaining, parent=parent)
    work.groups.append(level)
    leader = Sequence(
        -1 - level.group_id, list(tokens), len(tokens), first.params, group=parent, leads=level
    )
    level.leader = leader
    work.sequences.append(leader)
    return level


def _add_request(r: Request, group: PrefixGroup | None, work: Work) -> None:
    """Queue a request's sequences below ``group``, which counts the request once."""
    n = r.params.n
    if n > 1:
        aligned = len(r.prompt_token_ids) // work.block_size * work.block_size
        above = len(group.tokens) if group is not None else 0
        if aligned > above and r.params.prompt_logprobs is None:
            group = _open_level(work, list(r.prompt_token_ids[:aligned]), n, group, r)
        elif group is not None:
            group.remaining += n - 1  # the choices are members of the enclosing level
    seed = request_seed(r, work.seed)
    work.sequences += [_sequence(r, seed, group, i) for i in range(n)]


def build_sequences(
    requests: Seq[Request],
    policy: Policy,
    block_size: int,
    seed: int,
    plan: Plan | None = None,
    first_group_id: int = 0,
) -> Work:
    """Sequences for ``requests``; a planning policy needs the batch's ``plan`` (its indices
    are positions in ``requests``). Group ids start at ``first_group_id`` (unique per engine).

    Raises ValueError when a planning policy gets no plan or a plan of another batch."""
    work = Work([], {r.index: r for r in requests}, block_size, seed, first_group_id=first_group_id)
    if not Policy.parse(policy).plans:
        for r in requests:
            _add_request(r, None, work)
        return work
    if plan is None or len(plan.lengths) != len(requests):
        raise ValueError("the batchllm policy needs the plan of exactly these requests")
    scoring = [r for r in requests if r.params.prompt_logprobs is not None]
    if scoring:  # outside every level: their prompt's logits are needed
        keep = [i for i, r in enumerate(requests) if r.params.prompt_logprobs is None]
        plan, requests = plan.subset(keep), [requests[i] for i in keep]
    work.plan = plan
    _emit(plan.root, None, list(requests), work)
    for r in scoring:
        _add_request(r, None, work)
    return work


def _emit(level: Group, group: PrefixGroup | None, requests: list[Request], work: Work) -> None:
    """Queue a level's members and sub-levels in decode-ratio order (a sub-level: its leader,
    then its contents, so members always follow the leader whose prefix they reference)."""
    assert work.plan is not None
    for item in work.plan.in_order(level):
        if isinstance(item, int):
            _add_request(requests[item], group, work)
            continue
        first = requests[item.requests()[0]]
        tokens = list(first.prompt_token_ids[: item.prefix_len])
        sub = _open_level(work, tokens, len(item.members) + len(item.children), group, first)
        _emit(item, sub, requests, work)
