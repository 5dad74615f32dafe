"""Block tables kept across steps in arrays: the running sequences' (``BlockTables``) and the
live prefix levels' (``PrefixTables``).

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

Each prefix level a step reads gets a row of ``PrefixTables`` the first time (its own blocks,
written once: a level's blocks never change); the row is reused after the level has ended.
Both arrays record the version (the runner's step count) at which each row was last written,
so that a backend can keep device copies of them by row diffs (``AttentionStep.versions``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..scheduling.sequence import PrefixGroup, Sequence


class _Rows:
    """(rows, width) int32 rows padded with 0, and ``written`` (rows,) int64: the version at
    which each row was last written. Both dimensions grow (doubling) as needed; a grown array
    is a new array, every row of it written at the growing version."""

    def __init__(self, rows: int, width: int) -> None:
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.written = np.zeros(rows, dtype=np.int64)

    def _fit(self, row: int, width: int, version: int) -> None:
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
        self.written = np.full(rows, version, dtype=np.int64)
        self._grown(rows)

    def _grown(self, rows: int) -> None:
        """Hook: the array now has ``rows`` rows."""


class BlockTables(_Rows):
    """The running sequences' own blocks, one row per batch index."""

    def __init__(self, rows: int = 256, width: int = 64) -> None:
        super().__init__(rows, width)
        self.synced = [0] * rows  # blocks of each row's sequence written so far (from block 0)
        self.start = [0] * rows  # leading blocks of each row's sequence not stored (shared)

    def update(
        self,
        admitted: Iterable[Sequence],
        grown: Iterable[Sequence],
        shared: Callable[[Sequence], int],
        version: int,
    ) -> None:
        """Write the rows of ``admitted`` from scratch, their first ``shared(seq)`` blocks left
        out (the prefix they read through levels), then append to the rows of ``grown`` (and
        of ``admitted``) the blocks their tables gained since their rows were written; the rows
        written are marked with ``version``."""
        admitted = list(admitted)
        for seq in admitted:
            i, start = seq.batch_index, shared(seq)
            self._fit(i, len(seq.block_table) - start, version)
            self.table[i] = 0
            self.synced[i] = self.start[i] = start
        synced, table = self.synced, self.table
        written = []
        for seq in (*admitted, *grown):
            i, blocks = seq.batch_index, seq.block_table
            done = synced[i]
            if len(blocks) != done:
                start = self.start[i]
                if len(blocks) - start > table.shape[1]:
                    self._fit(i, len(blocks) - start, version)
                    table = self.table
                table[i, done - start : len(blocks) - start] = blocks[done:]
                synced[i] = len(blocks)
                written.append(i)
        self.written[written] = version

    def _grown(self, rows: int) -> None:
        self.synced += [0] * (rows - len(self.synced))
        self.start += [0] * (rows - len(self.start))


class PrefixTables(_Rows):
    """The live prefix levels' own blocks, one row per level (``row``)."""

    def __init__(self, rows: int = 64, width: int = 64) -> None:
        super().__init__(rows, width)
        self._rows: dict[PrefixGroup, int] = {}
        self._free: list[int] = []

    def row(self, group: PrefixGroup, blocks: np.ndarray, version: int) -> int:
        """The row holding ``group``'s ``blocks`` (its own part), written at ``version`` when
        the group gets its row. A group whose members have all finished gives its row back
        (looked for when no row is free)."""
        i = self._rows.get(group)
        if i is not None:
            return i
        if not self._free:
            self._sweep()
        i = self._free.pop() if self._free else len(self._rows)
        self._fit(i, len(blocks), version)
        self.table[i] = 0
        self.table[i, : len(blocks)] = blocks
        self.written[i] = version
        self._rows[group] = i
        return i

    def _sweep(self) -> None:
        """Give back the rows of the levels that have ended."""
        ended = [g for g in self._rows if g.remaining == 0]
        for g in ended:
            self._free.append(self._rows.pop(g))
        self._free.sort(reverse=True)  # lowest rows first: the array stays as small as it can
