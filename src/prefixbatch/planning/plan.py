"""The batch plan: nested groups in execution order, and what sharing saves, before any compute.

``R_saving = 1 - computed prefill tokens / prompt tokens``. The plan is made once per job (by the
job, the Python API or the Ray driver) and handed down to the scheduler; a Ray worker gets its
share of the driver's plan (``Plan.subset``). The comparison figures of the plan report (the
token-level tree, BatchLLM's one-level flattening, an LRU prefix cache in file order) are computed
only for the report (``report.py``).

Everything per request is an array (lengths, output budgets, the members of each level), so a
plan of a million requests is a few tens of megabytes and one Python object per level.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .groups import Group, build_levels, make_group
from .prefix_sort import SortedPrompts, sort_prompts
from .token_arrays import TokenArrays, as_token_arrays


@dataclass(frozen=True, eq=False)
class Plan:
    """``lengths`` and ``max_tokens``: (requests,) int64, by request index."""

    root: Group  # prefix_len 0: its members share nothing, its children are the top levels
    lengths: np.ndarray
    max_tokens: np.ndarray
    prompt_tokens: int
    computed_prefill_tokens: int

    @property
    def r_saving(self) -> float:
        return saving(self.computed_prefill_tokens, self.prompt_tokens)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Plan:
        """The plan of requests ``indices`` alone, renumbered ``0..len(indices)-1`` in that
        order: every level keeps its prefix; a level left with fewer than two requests hands
        them to its parent level, and a level with nothing of its own and a single sub-level is
        replaced by it (as when planning)."""
        idx = np.asarray(indices, dtype=np.int64)
        new = np.full(len(self.lengths), -1, dtype=np.int64)
        new[idx] = np.arange(len(idx))
        lengths, max_tokens = self.lengths[idx], self.max_tokens[idx]
        root = _restrict(self.root, new, lengths, max_tokens)
        if root is None:
            root = make_group(0, np.zeros(0, np.int64), (), lengths, max_tokens)
        return Plan(root, lengths, max_tokens, int(lengths.sum()), computed_tokens(root))

    def in_order(self, level: Group) -> Iterator[int | Group]:
        """A level's members (request indices) and sub-levels, highest decode ratio (expected
        output tokens / prefill tokens computed) first, so that decode-heavy work starts early
        and overlaps the prefill of what follows; ties keep the level's listing order."""
        members = level.members
        base = level.prefix_len
        ratio = np.concatenate(
            [
                self.max_tokens[members] / np.maximum(1, self.lengths[members] - base),
                [c.output_tokens / max(1, computed_tokens(c, base)) for c in level.children],
            ]
        )
        for k in np.argsort(-ratio, kind="stable").tolist():
            yield int(members[k]) if k < len(members) else level.children[k - len(members)]

    @property
    def shared_groups(self) -> list[Group]:
        """Every level that shares a prefix (all but the root)."""
        return [g for g, parent in self.root.walk() if parent is not None]


def saving(computed: int, total: int) -> float:
    return 1 - computed / total if total else 0.0


def computed_tokens(top: Group, base: int = 0) -> int:
    """Each level's extension once, plus every request's tokens after its level's prefix.
    ``base`` is the prefix length already computed above ``top``."""
    return top.prefix_len - base + top.own_tokens


def _restrict(
    g: Group, new: np.ndarray, lengths: np.ndarray, max_tokens: np.ndarray
) -> Group | None:
    """``g`` with only the requests ``new`` maps (to their new index); None when none is left."""
    mapped = new[g.members]
    members = [mapped[mapped >= 0]]
    children: list[Group] = []
    for c in g.children:
        sub = _restrict(c, new, lengths, max_tokens)
        if sub is None:
            continue
        if sub.size < 2:  # nothing left to share at this level
            members.append(sub.requests())
        elif not len(sub.members) and len(sub.children) == 1:
            children.append(sub.children[0])
        else:
            children.append(sub)
    kept = np.concatenate(members)
    if not len(kept) and not children:
        return None
    return make_group(g.prefix_len, kept, tuple(children), lengths, max_tokens)


def make_plan(
    prompts: TokenArrays | Sequence[Sequence[int]],
    max_tokens: Sequence[int] | np.ndarray,
    block_size: int,
    tree: SortedPrompts | None = None,
) -> Plan:
    """Sort the prompts (unless ``tree`` is their ``sort_prompts``), then cut their radix tree
    into nested block-aligned groups.

    Raises ValueError for a negative token id."""
    arrays = as_token_arrays(prompts)
    lengths = arrays.lengths
    budget = np.asarray(max_tokens, dtype=np.int64).reshape(len(arrays))
    tree = tree or sort_prompts(arrays)
    root = build_levels(tree.order, tree.lcp, lengths, budget, block_size)
    return Plan(root, lengths, budget, int(lengths.sum()), computed_tokens(root))
