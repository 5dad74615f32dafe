"""Turn requests into scheduler sequences in the order a policy wants.

``fcfs`` and ``fcfs-lru``: one plain sequence per request, in input order. ``batchllm``: the
plan's groups in decode-ratio order; a group with a shared prefix becomes one prefix-only sequence
followed by its members, which reference the prefix KV.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..outputs import Request
from ..planning.plan import Plan, make_plan
from .sequence import PrefixGroup, Sequence


@dataclass
class Work:
    sequences: list[Sequence]
    requests: dict[int, Request]  # seq_id -> request
    plan: Plan | None = None

    @property
    def num_groups(self) -> int:
        return len(self.plan.shared_groups) if self.plan else 0


def _generator(request: Request, seed: int) -> torch.Generator | None:
    if request.params.greedy:
        return None
    # Seeded per request, so a request samples the same tokens whatever shares its batch.
    s = request.params.seed if request.params.seed is not None else seed * 1_000_003 + request.index
    return torch.Generator().manual_seed(s)


def _sequence(seq_id: int, r: Request, seed: int, group: PrefixGroup | None = None) -> Sequence:
    return Sequence(seq_id, list(r.prompt_token_ids), len(r.prompt_token_ids), r.params,
                    group=group, generator=_generator(r, seed))


def build_sequences(requests: Seq[Request], policy: str, block_size: int, seed: int) -> Work:
    by_id = dict(enumerate(requests))
    if policy != "batchllm":
        return Work([_sequence(i, r, seed) for i, r in by_id.items()], by_id)
    plan = make_plan([r.prompt_token_ids for r in requests],
                     [r.params.max_tokens for r in requests], block_size)
    sequences: list[Sequence] = []
    for gid, group in enumerate(plan.groups):
        prefix_group = None
        if group.prefix_len:
            first = requests[group.members[0]]
            tokens = list(first.prompt_token_ids[: group.prefix_len])
            prefix_group = PrefixGroup(gid, tokens, remaining=len(group.members))
            sequences.append(Sequence(-1 - gid, list(tokens), len(tokens), first.params,
                                      group=prefix_group, prefix_only=True))
        sequences += [_sequence(m, requests[m], seed, prefix_group) for m in group.members]
    return Work(sequences, by_id, plan)
