"""Turns a scheduled step (plain Python sequences) into tensors, runs the model, returns logits.

The only place where bookkeeping becomes tensors: token ids, positions and the rows that sample
are built here; the step is described to the attention backend in device-neutral terms
(``AttentionStep``) and the backend builds its own metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import PrefixGroup, Sequence
from .attention.backend import AttentionBackend, to_device
from .attention.step import AttentionStep, PrefixLevel, SeqStep
from .models.decoder import DecoderModel


@dataclass
class _LevelRows:
    """The contiguous sequences (and rows) of a step below one prefix group."""

    group: PrefixGroup
    first_seq: int
    row_start: int
    depth: int
    last_seq: int = 0
    row_end: int = 0


def group_depth(group: PrefixGroup) -> int:
    """0 for a top-level group, 1 below it, ..."""
    depth = 0
    while group.parent is not None:
        group, depth = group.parent, depth + 1
    return depth


class ModelRunner:
    """Owns the model and the attention backend (and through it the KV cache).

    With ``share_prefix_attention`` (and a backend that ``shares_prefix``), sequences below
    prefix groups whose shared prefix has at least ``min_shared`` tokens read it through the
    step's prefix levels; every other sequence reads its whole context.
    """

    def __init__(
        self,
        model: DecoderModel,
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        share_prefix_attention: bool = False,
        min_shared: int = 0,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.share_prefix_attention = share_prefix_attention and backend.shares_prefix
        self.min_shared = max(1, min_shared)

    def _reads_levels(self, seq: Sequence) -> bool:
        return self.share_prefix_attention and seq.shared_len >= self.min_shared

    def _order(self, step: ScheduledStep) -> list[int]:
        """Sequences that read prefix levels first, depth-first by their groups (so that the
        rows below every level are contiguous), then the others in scheduled order."""

        def chain(seq: Sequence) -> tuple[int, ...]:
            ids, group = [], seq.group
            while group is not None:
                ids.append(group.group_id)
                group = group.parent
            return tuple(reversed(ids))

        keys = [(0, chain(s)) if self._reads_levels(s) else (1, ()) for s in step.seqs]
        return sorted(range(len(step.seqs)), key=lambda i: keys[i])

    def describe(self, step: ScheduledStep) -> tuple[AttentionStep, list[int], list[int]]:
        """The step for the backend, the new token ids in row order, and the row of each
        scheduled sequence's last token (indexed like ``step.seqs``)."""
        seqs: list[SeqStep] = []
        ids: list[int] = []
        last_row = [0] * len(step.seqs)
        open_levels: dict[int, _LevelRows] = {}  # id(group) -> the rows below it so far
        row = 0
        for i in self._order(step):
            seq, n = step.seqs[i], step.num_tokens[i]
            start, end = seq.computed, seq.computed + n
            ids += seq.tokens[start:end]
            shared = seq.shared_len if self._reads_levels(seq) else 0
            group = seq.group if shared else None
            depth = 0 if group is None else group_depth(group)
            while group is not None:  # every level above the sequence, innermost first
                lvl = open_levels.setdefault(id(group), _LevelRows(group, len(seqs), row, depth))
                lvl.last_seq, lvl.row_end = len(seqs), row + n
                group, depth = group.parent, depth - 1
            seqs.append(SeqStep(row, n, end, tuple(seq.block_table), shared))
            last_row[i] = row + n - 1
            row += n
        levels = [self._level(lvl) for lvl in open_levels.values()]
        return AttentionStep(tuple(seqs), tuple(levels), row, self.block_size), ids, last_row

    def _level(self, rows: _LevelRows) -> PrefixLevel:
        g = rows.group
        start = len(g.parent.tokens) if g.parent else 0
        end = len(g.tokens)
        bs = self.block_size
        return PrefixLevel(
            start,
            end,
            tuple(g.blocks[start // bs : end // bs]),
            rows.first_seq,
            rows.last_seq - rows.first_seq + 1,
            rows.row_start,
            rows.row_end,
            rows.depth,
        )

    def prepare(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """(input_ids (T,), positions (T,), backend metadata, logits_rows (S,)) for a step."""
        attn, ids, last_row = self.describe(step)
        positions = np.concatenate(
            [np.arange(s.context_len - s.q_len, s.context_len) for s in attn.seqs]
        )
        sample_rows = [last_row[i] for i, _ in step.samples]
        t = to_device(
            {
                "ids": np.array(ids, dtype=np.int64),
                "positions": positions.astype(np.int64),
                "logits_rows": np.array(sample_rows, dtype=np.int64),
            },
            self.device,
        )
        meta = self.backend.prepare(attn)
        return t["ids"], t["positions"], meta, t["logits_rows"]

    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Run one step; returns fp32 logits (S, vocab), one row per entry of ``step.samples``."""
        input_ids, positions, meta, logits_rows = self.prepare(step)
        return self.model(input_ids, positions, self.backend, meta, logits_rows)
