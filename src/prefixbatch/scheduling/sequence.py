"""A request's life inside the scheduler: its tokens, its KV blocks, its state."""

from __future__ import annotations

import enum
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from ..sampling_params import SamplingParams


def as_prompt(token_ids: Seq[int] | np.ndarray) -> np.ndarray:
    """``token_ids`` as a read-only (n,) int32 array, as sequences and levels hold their
    tokens: an int32 array is viewed, not copied. 4 bytes a token, where a tuple of ints takes 36
    and puts an int object per token between the running sequences' small objects.

    Raises OverflowError for an id outside int32 (no vocabulary is that large)."""
    if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.int32:
        if not token_ids.flags.writeable:
            return token_ids
    out = np.asarray(token_ids, dtype=np.int32).view()
    out.flags.writeable = False
    return out


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class PrefixGroup:
    """One level of shared prefix: ``tokens`` (the whole prefix from position 0) are computed
    once by the group's leader sequence and referenced by everything below the level.

    ``tokens``: (n,) int32 (``as_prompt``). ``blocks`` is the whole prefix's block table once
    ``ready``; the group itself holds one reference to its own part (the blocks after its parent's).
    ``remaining`` counts members and sub-levels not yet finished; at zero the group releases its
    blocks and counts itself off its parent. ``dependents`` are members whose prompt is exactly the
    prefix: they take their first token from the logits of the prefix's last token.
    """

    group_id: int
    tokens: np.ndarray
    remaining: int
    parent: PrefixGroup | None = None
    blocks: list[int] = field(default_factory=list)
    ready: bool = False
    dependents: list[Sequence] = field(default_factory=list)
    leader: Sequence | None = None  # the sequence that computes the prefix

    @property
    def own_blocks(self) -> list[int]:
        return self.blocks[len(self.parent.blocks) :] if self.parent else self.blocks


@dataclass(eq=False, slots=True, weakref_slot=True)
class Sequence:
    """One sequence: a request's choice, or the leader that computes a group's prefix
    (``leads``). ``seq_id`` is the request's id, shared by its ``n`` choices (``choice``
    0..n-1); a leader's is ``-1 - group_id``.

    ``prompt`` (``num_prompt`` tokens, a read-only (num_prompt,) int32 array: ``as_prompt``) then
    ``outputs`` (generated, with placeholders ``-1 - j`` at the end while their step is in flight)
    are its tokens; the first ``computed`` of them have KV in the cache (the last ``pending`` not
    yet). A sequence in a ``group`` starts with the group's prefix tokens, its ``block_table``
    starts with the group's blocks, and preemption frees only the blocks after them. While running
    it holds ``batch_index``: its row in the model runner's persistent per-sequence state (block
    tables), given by the scheduler at admission and taken back when it stops running.

    A decode step reads this object (its fields in slots) and appends to ``outputs``, a short
    list; it never touches the prompt's list (a page of its own per row, further apart the
    longer the prompts). For that, ``last_token`` is the last token (a decode step's input);
    the scheduler sets ``stop_ids`` (the tokens that end the output: EOS unless ignored, and
    ``stop_token_ids``) and ``max_outputs`` (the output count at which it ends: ``max_tokens``,
    or fewer at the model's length) when the sequence is added; ``stops_on_text`` says whether
    its params name stop strings (only those sequences are decoded while they run); ``kind``
    is the sampler's row kind (``execution/step_sampler.py``), filled on first use; while it
    runs, ``room`` is the token slots its block table has beyond its tokens
    (``len(block_table) * block_size - num_tokens``, kept by the scheduler; a small int in
    decode), so the scheduler sees that a decode row needs no new block without reading its
    lists.
    """

    seq_id: int
    prompt: np.ndarray
    num_prompt: int
    params: SamplingParams
    group: PrefixGroup | None = None
    leads: PrefixGroup | None = None
    seed: int = 0  # sampling seed (execution/sampler.py hashes it with the output index)
    choice: int = 0
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    preemptions: int = 0
    batch_index: int = -1
    # Block hashes of this sequence's full blocks (fcfs-lru's automatic prefix cache: an array,
    # no int object per block), and how many blocks of its table are registered in the cache
    # (each block is registered once).
    block_hashes: array[int] = field(default_factory=lambda: array("q"))
    registered: int = 0
    outputs: list[int] = field(default_factory=list)
    last_token: int = field(init=False)
    stop_ids: frozenset[int] = frozenset()
    max_outputs: int = 0
    stops_on_text: bool = field(init=False)
    kind: int = -1
    room: int = 0
    # Known tokens whose KV is not computed yet: 1 for a sequence in decode, a small int that a
    # step rewrites without making a new object (``computed`` is derived from it).
    pending: int = field(init=False)
    # Prompt tokens whose KV was computed before this sequence needed it (its group's prefix,
    # prefix-cache hits), as found at its first admission; -1 until then.
    cached: int = -1

    def __post_init__(self) -> None:
        self.prompt = as_prompt(self.prompt)
        self.last_token = self.tail_token
        self.stops_on_text = bool(self.params.stop)
        self.pending = self.num_prompt + len(self.outputs)

    @property
    def computed(self) -> int:
        """Leading tokens whose KV is in the cache."""
        return self.num_prompt + len(self.outputs) - self.pending

    @computed.setter
    def computed(self, value: int) -> None:
        self.pending = self.num_prompt + len(self.outputs) - value

    @property
    def tail_token(self) -> int:
        """The last of prompt and outputs, read from the lists (-1 for none): what
        ``last_token`` holds."""
        if self.outputs:
            return self.outputs[-1]
        return int(self.prompt[-1]) if self.num_prompt else -1

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens (placeholders included)."""
        return self.num_prompt + len(self.outputs)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + outputs as a list of ints (0 <= start <= stop)."""
        return self.token_array(start, stop).tolist()

    def token_array(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of prompt + outputs as an int32 array (0 <= start <= stop),
        without joining the two: a prompt slice is a view."""
        n = self.num_prompt
        if stop <= n:
            return self.prompt[start:stop]
        out = np.array(self.outputs[max(0, start - n) : stop - n], dtype=np.int32)
        return np.concatenate([self.prompt[start:], out]) if start < n else out

    @property
    def num_known(self) -> int:
        """Leading tokens known: placeholders (negative) are only ever at the end."""
        out = self.outputs
        k = len(out)
        while k and out[k - 1] < 0:
            k -= 1
        return self.num_prompt + k

    @property
    def num_output(self) -> int:
        return len(self.outputs)

    @property
    def output_tokens(self) -> list[int]:
        return list(self.outputs)

    @property
    def shared_len(self) -> int:
        """Leading tokens whose KV belongs to the group's prefix, not to this sequence."""
        return len(self.group.tokens) if self.group is not None else 0

    @property
    def own_blocks(self) -> list[int]:
        """Blocks this sequence holds a reference to (its table minus the group's prefix)."""
        return self.block_table[len(self.group.blocks) :] if self.group else self.block_table

    @property
    def last_block(self) -> int | None:
        """The block table's last block (None while it is empty): where a growing table would
        like its next block (``BlockManager.allocate``)."""
        return self.block_table[-1] if self.block_table else None

    def reset_to_prefix(self) -> None:
        """Forget everything after the group's prefix (before admission or after preemption)."""
        self.block_table = list(self.group.blocks) if self.group else []
        self.computed = self.shared_len
        self.registered = 0
