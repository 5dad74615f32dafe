"""Turn requests into scheduler sequences in the order a policy wants.

``fcfs`` and ``fcfs-lru``: one plain sequence per request, in input order. ``batchllm``: the plan's
nested groups in decode-ratio order; every level becomes a leader sequence that computes its
prefix (sampling nothing itself), followed by its members and sub-levels, which reference it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from ..outputs import Request
from ..planning.groups import Group
from ..planning.plan import Plan, make_plan
from .sequence import PrefixGroup, Sequence


@dataclass
class Work:
    sequences: list[Sequence]
    requests: dict[int, Request]  # seq_id -> request
    plan: Plan | None = None
    groups: list[PrefixGroup] = field(default_factory=list)


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


def build_sequences(requests: Seq[Request], policy: str, block_size: int, seed: int) -> Work:
    by_id = {r.index: r for r in requests}
    if policy != "batchllm":
        return Work([_sequence(r, seed) for r in requests], by_id)
    plan = make_plan(
        [r.prompt_token_ids for r in requests], [r.params.max_tokens for r in requests], block_size
    )
    work = Work([], by_id, plan)
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
            len(work.groups), tokens, len(item.members) + len(item.children), parent=group
        )
        work.groups.append(sub)
        work.sequences.append(
            Sequence(
                -1 - sub.group_id, list(tokens), len(tokens), first.params, group=group, leads=sub
            )
        )
        _emit(item, sub, requests, seed, work)
