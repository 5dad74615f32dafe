"""Turns a scheduled step (plain Python sequences) into tensors, runs the model, returns logits.

The only place where bookkeeping becomes tensors: token ids, positions and the rows that sample
are built here; the step is described to the attention backend in device-neutral terms
(``AttentionStep``) and the backend builds its own metadata. Host work per step is a few list
comprehensions over the step's sequences and array operations: the block tables persist across
steps (``BlockTables``, and the prefix levels' in ``PrefixTables``, each level's row written
once), with the version at which each row was written, so a backend can keep device copies by
row diffs; everything the device needs travels in one upload (``backend.upload``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch

from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import PrefixGroup
from ..scheduling.sequence import Sequence as SchedSequence
from .attention.backend import AttentionBackend
from .attention.step import AttentionStep, PrefixLevel, TableVersions
from .batch_rows import NO_LEVEL, BatchRows
from .block_tables import BlockTables, PrefixTables
from .cuda_graphs import DecodeGraphRunner, bucket_for
from .models.family import Forward
from .upload import Staged, upload


def group_depth(group: PrefixGroup) -> int:
    """0 for a top-level group, 1 below it, ..."""
    depth = 0
    while group.parent is not None:
        group, depth = group.parent, depth + 1
    return depth


@dataclass(frozen=True)
class StepInputs:
    """A step on the host: the attention step, ``input_ids`` and ``positions`` (T,) int64 in
    row order, and ``logits_rows`` (R,) int64, the rows whose logits the step returns."""

    attn: AttentionStep
    input_ids: np.ndarray
    positions: np.ndarray
    logits_rows: np.ndarray


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
        self.tables = BlockTables()
        self.prefix_tables = PrefixTables()
        self.batch = BatchRows()
        self._level_blocks: WeakKeyDictionary[PrefixGroup, np.ndarray] = WeakKeyDictionary()
        self._version = 0  # steps described so far: the version of the tables' rows

    def inputs(self, step: ScheduledStep, every_row: Sequence[int] = ()) -> StepInputs:
        """The step on the host. Sequences that read prefix levels come first, depth-first by
        their groups (group ids are given in depth-first order, so sorting by the innermost
        group's id makes the rows below every level contiguous), then the others in scheduled
        order. ``logits_rows`` holds the row of each entry of ``step.samples``, then every row
        of the sequences ``every_row`` (indices into ``step.seqs``, in that order: prompt
        scoring)."""
        seqs = step.seqs
        self._version += 1
        self.tables.update(step.admitted, step.grown, self._shared_blocks, self._version)
        self.batch.admit(step.admitted, self._reads)
        n = np.array(step.num_tokens, dtype=np.int64)
        # One pass over the sequences for their rows: everything else comes from the rows'
        # persistent state (``BatchRows``) by array operations.
        rows = np.array([s.batch_index for s in seqs], dtype=np.int64)
        assert rows.min(initial=0) >= 0, "a scheduled sequence is not running"
        keys = self.batch.key[rows]
        reading = bool(len(keys)) and int(keys.min()) != NO_LEVEL
        order = np.argsort(keys, kind="stable") if reading else np.arange(len(seqs))
        rows, keys, q_len = rows[order], keys[order], n[order]
        start = self.batch.computed[rows]
        context = start + q_len
        self.batch.computed[rows] = context
        q_start = np.cumsum(q_len) - q_len
        num_rows = int(q_len.sum())
        if reading:
            shared = self.batch.shared[rows]
            levels = self._levels(rows, keys, q_start, q_len)
        else:
            shared = np.zeros(len(seqs), dtype=np.int64)
            levels = ()
        versions = TableVersions(self.tables.written, self.prefix_tables.written, self._version)
        attn = AttentionStep(
            q_start, q_len, context, shared, self.tables.table, rows, levels, num_rows,
            self.block_size, self.prefix_tables.table, versions,
        )  # fmt: skip
        if num_rows == len(seqs):  # one new token per sequence: decode rows (their last
            # token, read without touching the token lists) or 1-token prefill chunks
            last = [
                s.last_token if s.pending == 1 else s.token_slice(s.computed, s.computed + 1)[0]
                for s in seqs
            ]
            input_ids = np.array(last, dtype=np.int64)[order]
        else:
            parts = [
                seqs[i].token_array(first, first + k)
                for i, first, k in zip(order.tolist(), start.tolist(), q_len.tolist())
            ]
            input_ids = np.concatenate(parts).astype(np.int64)
        positions = np.arange(num_rows, dtype=np.int64) - np.repeat(q_start - start, q_len)
        last_row = np.empty(len(seqs), dtype=np.int64)
        last_row[order] = q_start + q_len - 1
        logits_rows = [last_row[step.sample_rows]]
        for i in every_row:
            logits_rows.append(np.arange(last_row[i] - n[i] + 1, last_row[i] + 1))
        return StepInputs(attn, input_ids, positions, np.concatenate(logits_rows))

    def _reads(self, seq: SchedSequence) -> PrefixGroup | None:
        """The group whose prefix ``seq`` reads through levels (None when it reads none)."""
        g = seq.group
        if not self.share_prefix_attention or g is None or len(g.tokens) < self.min_shared:
            return None
        return g

    def _shared_blocks(self, seq: SchedSequence) -> int:
        """Blocks of the prefix ``seq`` reads through levels (0 when it reads none)."""
        g = self._reads(seq)
        return 0 if g is None else len(g.tokens) // self.block_size

    def _levels(
        self, rows: np.ndarray, keys: np.ndarray, q_start: np.ndarray, q_len: np.ndarray
    ) -> tuple[PrefixLevel, ...]:
        """The prefix levels above the sequences (in step order: ``rows`` their batch
        indices, ``keys`` their innermost groups' ids, sorted): one per group with a sequence
        below it, innermost first along each sequence's chain, as the sequences are met. Python
        work per run of sequences in one innermost group, not per sequence."""
        readers = int(np.searchsorted(keys, NO_LEVEL))
        firsts = np.flatnonzero(np.diff(keys[:readers], prepend=-1))
        lasts = np.append(firsts[1:], readers) - 1
        spans: dict[int, list[Any]] = {}  # id(group) -> [group, first, last, depth]
        for first, last in zip(firsts.tolist(), lasts.tolist()):
            group = self.batch.groups[int(rows[first])]
            depth = group_depth(group)  # type: ignore[arg-type]
            while group is not None:
                span = spans.setdefault(id(group), [group, first, last, depth])
                span[2] = last
                group, depth = group.parent, depth - 1
        bs = self.block_size
        q_end = q_start + q_len
        levels = []
        for group, first, last, depth in spans.values():
            begin = len(group.parent.tokens) if group.parent else 0
            blocks = self._level_blocks.get(group)
            if blocks is None:
                blocks = np.array(group.blocks[begin // bs : len(group.tokens) // bs], np.int32)
                self._level_blocks[group] = blocks
            row = self.prefix_tables.row(group, blocks, self._version)
            levels.append(
                PrefixLevel(
                    begin,
                    len(group.tokens),
                    blocks,
                    first,
                    last - first + 1,
                    int(q_start[first]),
                    int(q_end[last]),
                    depth,
                    row,
                )
            )
        return tuple(levels)

    def execute(
        self,
        step: ScheduledStep,
        every_row: Sequence[int] = (),
        extra: dict[str, np.ndarray] | None = None,
        previous_tokens: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run one step; returns fp32 logits (S, vocab), one row per entry of ``step.samples``,
        followed by the logits of every new token of the sequences ``every_row`` (indices into
        ``step.seqs``), and the ``extra`` host arrays (the sampler's) on the device: they travel
        in the step's one upload. A token not known on the host yet (``-1 - j``: the previous
        step's ``j``-th sample, see ``Scheduler.advance``) is taken from ``previous_tokens``
        (that step's sampled tokens, on the device). A decode step that fits a captured
        batch-size bucket replays its CUDA graph. With ``hidden`` the rows are the model's
        final-norm hidden states (S, hidden) fp32 instead of logits (embeddings, and greedy
        steps whose sampler fuses the lm_head with the argmax; never through a graph)."""
        inputs = self.inputs(step, every_row)
        staged, graph = self._staged(inputs.attn, graphs=not hidden)
        arrays = {"ids": inputs.input_ids, "positions": inputs.positions}
        arrays["logits_rows"] = inputs.logits_rows
        arrays |= {f"attn.{k}": a for k, a in staged.arrays.items()}
        arrays |= {f"extra.{k}": a for k, a in (extra or {}).items()}
        t = upload(arrays, self.device)
        meta = staged.build({k[5:]: v for k, v in t.items() if k.startswith("attn.")})
        extras = {k[6:]: v for k, v in t.items() if k.startswith("extra.")}
        ids = t["ids"]
        if len(inputs.input_ids) and inputs.input_ids.min() < 0:
            assert previous_tokens is not None, "a token placeholder without the previous step"
            earlier = previous_tokens.index_select(0, (-1 - ids).clamp_(min=0))
            ids = torch.where(ids < 0, earlier, ids)
        if graph:
            assert self.graphs is not None
            logits = self.graphs.run(ids, t["positions"], meta)[t["logits_rows"]]
        else:
            rows = t["logits_rows"]
            if hidden:  # (the flag only when set: wrappers of a forward may not know it)
                logits = self.model(ids, t["positions"], self.backend, meta, rows, hidden=True)
            else:
                logits = self.model(ids, t["positions"], self.backend, meta, rows)
        return logits, extras

    def _staged(self, attn: AttentionStep, graphs: bool = True) -> tuple[Staged[Any], bool]:
        """The step's metadata (padded to its bucket when it is a decode step the graphs
        take, and ``graphs``), and whether it runs through a graph."""
        if graphs and self.graphs is not None and (attn.q_len == 1).all():
            bucket = bucket_for(attn.num_rows, self.graphs.buckets)
            if bucket is not None:
                try:
                    return self.graphs.hooks.stage_graph(attn, bucket), True
                except ValueError:  # deeper nesting or more levels than the bucket holds
                    pass
        return self.backend.stage(attn), False
