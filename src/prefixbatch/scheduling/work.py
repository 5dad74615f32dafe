"""Turn requests into scheduler sequences in the order a policy wants.

``fcfs`` and ``fcfs-lru``: one plain sequence per request, in input order. ``batchllm``: the
plan's nested groups in decode-ratio order; every level becomes a leader sequence that computes
its prefix (sampling nothing itself), followed by its members and sub-levels, which reference it.
The plan is made before (by the job, the API or the Ray driver), never here.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from ..outputs import Request
from ..planning.groups import Group
from ..planning.plan import Plan
from .policy import Policy
from .sequence import PrefixGroup, Sequence


@dataclass
class Work:
    sequences: list[Sequence]
    requests: dict[int, Request]  # seq_id -> request
    plan: Plan | None = None
    groups: list[PrefixGroup] = field(default_factory=list)
    first_group_id: int = 0


def request_seed(request: Request, job_seed: int) -> int:
    """The request's sampling seed: its own, or derived from the job's seed and its index (so a
    request samples the same tokens whatever shares its batch)."""
    if request.params.seed is not None:
        return request.params.seed
    return job_seed * 1_000_003 + request.index


def _sequence(r: Request, seed: int, group: PrefixGroup | None = None) -> Sequence:
    seq = Sequence(
        r.index,
        list(r.prompt_token_ids),
        len(r.prompt_token_ids),
        r.params,
        group=group,
        seed=request_seed(r, seed),
    )
    if group is not None and seq.num_prompt == len(group.tokens):
        group.dependents.append(seq)
    return seq


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
    by_id = {r.index: r for r in requests}
    if not Policy.parse(policy).plans:
        return Work([_sequence(r, seed) for r in requests], by_id)
    if plan is None or len(plan.lengths) != len(requests):
        raise ValueError("the batchllm policy needs the plan of exactly these requests")
    work = Work([], by_id, plan, first_group_id=first_group_id)
    _emit(plan.root, None, list(requests), seed, work)
    return work


def _emit(
    level: Group, group: PrefixGroup | None, requests: list[Request], seed: int, work: Work
) -> None:
    """Queue a level's members and sub-levels in decode-ratio order (a sub-level: its leader,
    then its contents, so members always follow the leader whose prefix they reference)."""
    assert work.plan is not None
    for item in work.plan.in_order(level):
        if isinstance(item, int):
            work.sequences.append(_sequence(requests[item], seed, group))
            continue
        first = requests[item.requests()[0]]
        tokens = list(first.prompt_token_ids[: item.prefix_len])
        sub = PrefixGroup(
            work.first_group_id + len(work.groups),
            tokens,
            len(item.members) + len(item.children),
            parent=group,
        )
        work.groups.append(sub)
        leader = Sequence(
            -1 - sub.group_id, list(tokens), len(tokens), first.params, group=group, leads=sub
        )
        sub.leader = leader
        work.sequences.append(leader)
        _emit(item, sub, requests, seed, work)
