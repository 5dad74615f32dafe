"""The block tables of the running sequences, kept across steps in one array.

Each running sequence owns a row (its ``batch_index``, given by the scheduler when it is
admitted); the row holds its own blocks: those after the shared prefix it reads through prefix
levels (all of its blocks when it reads none), padded with 0. A step writes only what changed
since the last one: the whole row of a sequence admitted in this step (or admitted again after a
preemption), and for the sequences whose table grew (the scheduler names them: one in
``block_size`` decode rows per step) the blocks appended since their row was last written; the
other rows are not visited. The step hands the array to the attention backend as it is
(``AttentionStep.tables``); the blocks a row attends itself are then one contiguous slice.
Host work per step therefore does not grow with the shared prefix, nor with the number of
blocks a sequence holds beyond the ones it reads (vLLM v1 keeps its block tables in a
persistent batch too, ``vllm/v1/worker/block_table.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..scheduling.sequence import Sequence


class BlockTables:
    """(rows, width) int32 block tables indexed by batch index; both dimensions grow (doubling)
    as needed."""

    def __init__(self, rows: int = 256, width: int = 64) -> None:
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.synced = [0] * rows  # blocks of each row's sequence written so far (from block 0)
        self.start = [0] * rows  # leading blocks of each row's sequence not stored (shared)

    def update(
        self,
        admitted: Iterable[Sequence],
        grown: Iterable[Sequence],
        shared: Callable[[Sequence], int],
    ) -> None:
        """Write the rows of ``admitted`` from scratch, their first ``shared(seq)`` blocks left
        out (the prefix they read through levels), then append to the rows of ``grown`` (and
        of ``admitted``) the blocks their tables gained since their rows were written."""
        admitted = list(admitted)
        for seq in admitted:
            i, start = seq.batch_index, shared(seq)
            self._fit(i, len(seq.block_table) - start)
            self.table[i] = 0
            self.synced[i] = self.start[i] = start
        synced, table = self.synced, self.table
        for seq in (*admitted, *grown):
            i, blocks = seq.batch_index, seq.block_table
            done = synced[i]
            if len(blocks) != done:
                start = self.start[i]
                if len(blocks) - start > table.shape[1]:
                    self._fit(i, len(blocks) - start)
                    table = self.table
                table[i, done - start : len(blocks) - start] = blocks[done:]
                synced[i] = len(blocks)

    def _fit(self, row: int, width: int) -> None:
        """Grow the array to hold ``row`` and ``width`` blocks."""
        rows, cols = self.table.shape
        if row < rows and width <= cols:
            return
        while rows <= row:
            rows *= 2
        while cols < width:
            cols *= 2
        grown = np.zeros((rows, cols), dtype=np.int32)
        grown[: self.table.shape[0], : self.table.shape[1]] = self.table
        self.table = grown
        self.synced += [0] * (rows - len(self.synced))
        self.start += [0] * (rows - len(self.start))
