"""What the model runner knows about each running sequence, kept across steps by batch index
(the row the scheduler gives a sequence while it runs): the prefix group it reads through
levels, the length of that shared prefix, its sort key, and its count of computed tokens.

A sequence's group never changes, so its row is written when it is admitted (again, after a
preemption); its computed count advances by the tokens each step describes for it. A step then
reads these as arrays indexed by its rows (vLLM v1's persistent batch keeps its requests'
computed-token counts the same way, ``vllm/v1/worker/gpu_input_batch.py``) instead of walking
every sequence's fields and token lists, which the rows of a decode step leave in memory far
apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..scheduling.sequence import PrefixGroup, Sequence

NO_LEVEL = 1 << 62  # sort key of a sequence that reads no prefix level: after all the others


class BatchRows:
    """Per batch index: ``key`` (the id of the innermost group read through levels, or
    ``NO_LEVEL``), ``shared`` (that group's prefix length in tokens, else 0), ``computed``
    (tokens with KV, as of the last step described), int64 arrays; ``groups`` the group
    objects. Grows (doubling) with the highest batch index."""

    def __init__(self, rows: int = 256) -> None:
        self.key = np.full(rows, NO_LEVEL, dtype=np.int64)
        self.shared = np.zeros(rows, dtype=np.int64)
        self.computed = np.zeros(rows, dtype=np.int64)
        self.groups: list[PrefixGroup | None] = [None] * rows

    def admit(
        self, seqs: Iterable[Sequence], reads: Callable[[Sequence], PrefixGroup | None]
    ) -> None:
        """Write the rows of sequences admitted in this step: ``reads(seq)`` is the group whose
        prefix it reads through levels (None: it reads its whole context itself)."""
        for seq in seqs:
            i = seq.batch_index
            if i >= len(self.key):
                self._grow(i)
            group = reads(seq)
            self.groups[i] = group
            self.key[i] = NO_LEVEL if group is None else group.group_id
            self.shared[i] = 0 if group is None else len(group.tokens)
            self.computed[i] = seq.computed

    def _grow(self, row: int) -> None:
        rows = len(self.key)
        while rows <= row:
            rows *= 2
        more = rows - len(self.key)
        self.key = np.append(self.key, np.full(more, NO_LEVEL, dtype=np.int64))
        self.shared = np.append(self.shared, np.zeros(more, dtype=np.int64))
        self.computed = np.append(self.computed, np.zeros(more, dtype=np.int64))
        self.groups += [None] * more
