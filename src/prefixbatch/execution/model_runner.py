"""Turns a scheduled step (plain Python sequences) into tensors, runs the model, returns logits.

The only place where bookkeeping becomes tensors: token ids, positions and the rows that sample
are built here; the step is described to the attention backend in device-neutral terms
(``AttentionStep``) and the backend builds its own metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import PrefixGroup
from ..scheduling.sequence import Sequence as SchedSequence
from .attention.backend import AttentionBackend, to_device
from .attention.step import AttentionStep, PrefixLevel, SeqStep
from .cuda_graphs import DecodeGraphRunner, bucket_for
from .models.family import Forward


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
    prefix groups whose shared prefix has at least ``min_shared`` tokens (None: the backend's
    ``min_shared_prefix``) read it through the step's prefix levels; every other sequence reads
    its whole context. With ``graphs``, decode steps run through the backend's captured CUDA
    graphs (``cuda_graphs.py``).
    """

    def __init__(
        self,
        model: Forward,
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        share_prefix_attention: bool = False,
        min_shared: int | None = None,
        graphs: DecodeGraphRunner | None = None,
    ) -> None:
        self.graphs = graphs
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.share_prefix_attention = share_prefix_attention and backend.shares_prefix
        self.min_shared = max(1, backend.min_shared_prefix if min_shared is None else min_shared)

    def _reads_levels(self, seq: SchedSequence) -> bool:
        return self.share_prefix_attention and seq.shared_len >= self.min_shared

    def _order(self, step: ScheduledStep) -> list[int]:
        """Sequences that read prefix levels first, depth-first by their groups (so that the
        rows below every level are contiguous), then the others in scheduled order."""

        def chain(seq: SchedSequence) -> tuple[int, ...]:
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

    def inputs(
        self, step: ScheduledStep, every_row: Sequence[int] = ()
    ) -> tuple[AttentionStep, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(attention step, input_ids (T,), positions (T,), logits_rows) of a step, the
        tensors on the device in one copy. ``logits_rows`` holds the row of each entry of
        ``step.samples``, then every row of the sequences ``every_row`` (indices into
        ``step.seqs``, in that order: prompt scoring)."""
        attn, ids, last_row = self.describe(step)
        positions = np.concatenate(
            [np.arange(s.context_len - s.q_len, s.context_len) for s in attn.seqs]
        )
        sample_rows = [last_row[i] for i, _ in step.samples]
        for i in every_row:
            n = step.num_tokens[i]
            sample_rows += range(last_row[i] - n + 1, last_row[i] + 1)
        t = to_device(
            {
                "ids": np.array(ids, dtype=np.int64),
                "positions": positions.astype(np.int64),
                "logits_rows": np.array(sample_rows, dtype=np.int64),
            },
            self.device,
        )
        return attn, t["ids"], t["positions"], t["logits_rows"]

    def execute(self, step: ScheduledStep, every_row: Sequence[int] = ()) -> torch.Tensor:
        """Run one step; returns fp32 logits (S, vocab), one row per entry of ``step.samples``,
        followed by the logits of every new token of the sequences ``every_row`` (indices into
        ``step.seqs``). A decode step that fits a captured batch-size bucket replays its CUDA
        graph."""
        attn, input_ids, positions, logits_rows = self.inputs(step, every_row)
        graph_meta = self._graph_metadata(attn)
        if graph_meta is not None:
            assert self.graphs is not None
            return self.graphs.run(input_ids, positions, graph_meta)[logits_rows]
        meta = self.backend.prepare(attn)
        return self.model(input_ids, positions, self.backend, meta, logits_rows)

    def _graph_metadata(self, attn: AttentionStep) -> Any | None:
        """The step's metadata padded to its bucket when it is a decode step the graphs take."""
        if self.graphs is None or any(s.q_len != 1 for s in attn.seqs):
            return None
        bucket = bucket_for(attn.num_rows, self.graphs.buckets)
        if bucket is None:
            return None
        try:
            return self.graphs.hooks.prepare_graph(attn, bucket)
        except ValueError:  # deeper nesting or more levels than the bucket holds: eager
            return None
