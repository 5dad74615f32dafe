"""The step an attention backend receives, in device-neutral terms.

The model runner describes every scheduled sequence by its query rows, its block table and how
many positions it attends; sequences below shared prefix levels also name those levels. Each
backend turns this description into its own metadata (``AttentionBackend.stage``), so no
backend-specific field is built for backends that do not read it.

Rows are the flattened step: all new tokens of all sequences, concatenated in sequence order.
The runner orders sequences so that the sequences below any prefix level are contiguous
(depth-first over the prefix groups): a level then covers one range of rows.

The per-sequence fields are arrays (one entry per sequence), so that backends build their
metadata with array operations; ``SeqStep`` is one sequence's view of them, for code that walks
sequences one at a time (the reference paths, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class SeqStep:
    """One sequence of the step.

    Its queries are rows ``[q_start, q_start + q_len)``, at positions
    ``[context_len - q_len, context_len)`` (causal with that offset). ``block_table`` maps
    positions to KV blocks (position ``p`` is slot ``block_table[p // block_size] * block_size
    + p % block_size``). The first ``shared_len`` positions (block-aligned) are read through the
    prefix levels listed in ``AttentionStep.levels``; the sequence itself attends only to
    ``[shared_len, context_len)``. ``shared_len`` is 0 for a sequence read as a whole.
    """

    q_start: int
    q_len: int
    context_len: int
    block_table: tuple[int, ...]
    shared_len: int = 0


@dataclass(frozen=True)
class PrefixLevel:
    """One level of shared prefix: positions ``[start, end)`` held in ``block_ids`` (whole
    blocks, the level's own part after its parent level), read by every query row of sequences
    ``[first_seq, first_seq + num_seqs)`` of the step (rows ``[row_start, row_end)``)."""

    start: int
    end: int
    block_ids: Sequence[int]  # a tuple, or an int array the runner keeps per prefix group
    first_seq: int
    num_seqs: int
    row_start: int
    row_end: int
    depth: int  # 0 for a top-level prefix, 1 below it, ...
    # Row of ``AttentionStep.prefix_tables`` holding ``block_ids`` (-1: none, the step has no
    # persistent table for its levels).
    table_row: int = -1


@dataclass(frozen=True, eq=False)
class TableVersions:
    """When the rows of a step's persistent tables last changed, for a device copy kept in
    step by row diffs (``attention/resident_table.py``): ``tables`` (R,) and ``prefix_tables``
    (LR,) int64 hold the version at which each row of ``AttentionStep.tables`` /
    ``AttentionStep.prefix_tables`` was last written, ``version`` is the current one (rows of
    a grown array count as written at it). Versions only grow."""

    tables: np.ndarray
    prefix_tables: np.ndarray
    version: int


@dataclass(frozen=True, eq=False)
class AttentionStep:
    """Every sequence of one forward step and the prefix levels they share.

    Per sequence, shape (S,) int64: ``q_start``, ``q_len``, ``context_len``, ``shared_len``
    (``SeqStep`` says what they mean). A sequence's own blocks (those of positions
    ``[shared_len, context_len)``, which it attends itself) are row ``table_rows[i]`` of
    ``tables`` (R, W) int32, padded with 0 (the model runner keeps the rows of all running
    sequences in one array across steps and hands it over as it is, valid for this step).
    Backends gather what they read: ``own_tables``, or ``full_tables`` (the prefix's blocks
    from the levels, then the own ones). ``levels`` is empty when the policy or backend reads
    every sequence as a whole. Each row of a sequence with ``shared_len > 0`` is covered by
    exactly the levels whose row range holds it, and those levels tile ``[0, shared_len)``.

    The model runner also keeps every live prefix level's blocks in one array across steps,
    ``prefix_tables`` (LR, LW) int32 (a level's ``block_ids`` in row ``table_row``, padded with
    0), and says which rows of both arrays changed when (``versions``): a backend may then keep
    device copies of the two arrays by row diffs and read them in place, instead of gathering
    the step's rows every step. Both are None for a step made from records (``of``).
    """

    q_start: np.ndarray
    q_len: np.ndarray
    context_len: np.ndarray
    shared_len: np.ndarray
    tables: np.ndarray
    table_rows: np.ndarray
    levels: tuple[PrefixLevel, ...]
    num_rows: int
    block_size: int
    prefix_tables: np.ndarray | None = None
    versions: TableVersions | None = None

    @classmethod
    def of(
        cls,
        seqs: Sequence[SeqStep],
        levels: Sequence[PrefixLevel] = (),
        num_rows: int | None = None,
        block_size: int = 16,
    ) -> AttentionStep:
        """A step from per-sequence records (``num_rows`` defaults to the sum of ``q_len``)."""

        def column(key: str) -> np.ndarray:
            return np.array([getattr(s, key) for s in seqs], dtype=np.int64)

        own = [s.block_table[s.shared_len // block_size :] for s in seqs]
        tables = np.zeros((len(seqs), max([1, *map(len, own)])), dtype=np.int32)
        for i, blocks in enumerate(own):
            tables[i, : len(blocks)] = blocks
        q_len = column("q_len")
        return cls(
            column("q_start"),
            q_len,
            column("context_len"),
            column("shared_len"),
            tables,
            np.arange(len(seqs)),
            tuple(levels),
            int(q_len.sum()) if num_rows is None else num_rows,
            block_size,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.q_len)

    def own_tables(self, which: np.ndarray | None = None, pad_first: bool = False) -> np.ndarray:
        """(B, NB) int32 blocks of sequences ``which`` (default: all) from their
        ``shared_len`` on: column ``j`` of row ``b`` holds positions ``shared_len + j *
        block_size ..``. Padded with 0, or with the row's first own block (``pad_first``: a
        padded read then reads written K/V, masked out anyway). One gather of contiguous rows,
        whatever the sequences' prefixes."""
        which = np.arange(self.num_seqs) if which is None else which
        bs = self.block_size
        count = -(-self.context_len[which] // bs) - self.shared_len[which] // bs  # >= 1
        own = self.tables[self.table_rows[which], : max(1, int(count.max(initial=1)))]
        if not pad_first:
            return own
        return np.where(np.arange(own.shape[1])[None, :] < count[:, None], own, own[:, :1])

    def full_tables(self, which: np.ndarray | None = None) -> np.ndarray:
        """(B, NB) int32 block tables of sequences ``which`` (default: all) from position 0:
        the blocks of the levels above each one (depth first), then its own; padded with 0.
        Python work per sequence: for a step's few prefill chunks, or tests."""
        which = np.arange(self.num_seqs) if which is None else which
        own = self.own_tables(which)
        rows = []
        for row, i in enumerate(which.tolist()):
            above = sorted(
                (lvl for lvl in self.levels if lvl.first_seq <= i < lvl.first_seq + lvl.num_seqs),
                key=lambda lvl: lvl.depth,
            )
            rows.append([int(x) for lvl in above for x in lvl.block_ids] + own[row].tolist())
        width = int(-(-self.context_len[which].max(initial=1) // self.block_size))
        out = np.zeros((len(rows), max(1, width)), dtype=np.int32)
        for row, blocks in enumerate(rows):
            out[row, : min(width, len(blocks))] = blocks[:width]
        return out

    @cached_property
    def seqs(self) -> tuple[SeqStep, ...]:
        """Each sequence as a ``SeqStep`` (its table cut to the blocks its context needs)."""
        bs = self.block_size
        tables = self.full_tables()
        return tuple(
            SeqStep(
                int(start),
                int(n),
                int(ctx),
                tuple(tables[i, : -(-int(ctx) // bs)].tolist()),
                int(shared),
            )
            for i, (start, n, ctx, shared) in enumerate(
                zip(self.q_start, self.q_len, self.context_len, self.shared_len)
            )
        )

    @property
    def max_depth(self) -> int:
        """Nesting depth of the deepest level (0 when no level)."""
        return 1 + max(lvl.depth for lvl in self.levels) if self.levels else 0
