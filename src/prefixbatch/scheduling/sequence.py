"""A request's life inside the scheduler: its tokens, its KV blocks, its state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class PrefixGroup:
    """A group's shared prefix: computed once by its prefix sequence, referenced by its members,
    freed when ``remaining`` (members not yet finished) reaches zero."""

    group_id: int
    tokens: list[int]
    remaining: int
    blocks: list[int] = field(default_factory=list)
    ready: bool = False  # the prefix KV is fully computed


@dataclass(eq=False)
class Sequence:
    """One sequence: a request, or a group's prefix-only sequence (``prefix_only``).

    ``tokens`` are prompt + generated tokens; ``computed`` of them have KV in the cache.
    A group member's ``block_table`` starts with its group's prefix blocks and its ``tokens``
    start with the prefix tokens; preemption frees only the member's own blocks.
    """

    seq_id: int
    tokens: list[int]
    num_prompt: int
    params: SamplingParams
    group: PrefixGroup | None = None
    prefix_only: bool = False
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    preemptions: int = 0
    # Block hashes of this sequence's full blocks (fcfs-lru's automatic prefix cache).
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not computed yet (1 for a sequence in decode)."""
        return len(self.tokens) - self.computed

    @property
    def shared_len(self) -> int:
        """Leading tokens whose KV belongs to the group's prefix, not to this sequence."""
        return len(self.group.tokens) if self.group is not None and not self.prefix_only else 0

    @property
    def own_blocks(self) -> list[int]:
        """Blocks this sequence holds a reference to (its table minus the group's prefix)."""
        shared = len(self.group.blocks) if self.shared_len else 0
        return self.block_table[shared:]
