"""The step an attention backend receives, in device-neutral terms.

The model runner describes every scheduled sequence by its query rows, its block table and how
many positions it attends; sequences below shared prefix levels also name those levels. Each
backend turns this description into its own metadata (``AttentionBackend.prepare``), so no
backend-specific field is built for backends that do not read it.

Rows are the flattened step: all new tokens of all sequences, concatenated in ``seqs`` order.
The runner orders sequences so that the sequences below any prefix level are contiguous
(depth-first over the prefix groups): a level then covers one range of rows.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    block_ids: tuple[int, ...]
    first_seq: int
    num_seqs: int
    row_start: int
    row_end: int
    depth: int  # 0 for a top-level prefix, 1 below it, ...


@dataclass(frozen=True)
class AttentionStep:
    """Every sequence of one forward step and the prefix levels they share.

    ``levels`` is empty when the policy or backend reads every sequence as a whole. Each row of a
    sequence with ``shared_len > 0`` is covered by exactly the levels whose row range holds it,
    and those levels tile ``[0, shared_len)``.
    """

    seqs: tuple[SeqStep, ...]
    levels: tuple[PrefixLevel, ...]
    num_rows: int
    block_size: int

    @property
    def max_depth(self) -> int:
        """Nesting depth of the deepest level (0 when no level)."""
        return 1 + max(lvl.depth for lvl in self.levels) if self.levels else 0
