"""Turns a scheduled step (plain Python sequences) into tensors, runs the model, returns logits.

The only place where bookkeeping becomes tensors: token ids, positions, KV slots and the
attention metadata for the step.
"""

from __future__ import annotations

import torch

from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import PrefixGroup
from .attention.backend import (
    AttentionBackend,
    DecodeBatch,
    PrefillSlice,
    PrefixSegment,
    StepMetadata,
)
from .models.decoder import DecoderModel


class ModelRunner:
    """Owns the model and the attention backend (and through it the KV cache).

    With ``share_prefix_attention``, sequences below prefix groups whose shared prefix has at
    least ``min_shared`` tokens are described as prefix segments plus their own KV; every other
    sequence reads its whole context (plain path).
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
        self.share_prefix_attention = share_prefix_attention
        self.min_shared = max(1, min_shared)

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence with block table ``table``."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def prepare(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        last_rows: list[int] = []
        prefills: list[PrefillSlice] = []
        decode: list[tuple[int, list[int], int]] = []
        members: list[PrefillSlice] = []
        member_decode: list[tuple[int, list[int], int]] = []
        segment_rows: dict[int, tuple[PrefixGroup, list[torch.Tensor]]] = {}
        row = 0
        for seq, n in zip(step.seqs, step.num_tokens):
            start, end = seq.computed, seq.computed + n
            ids += seq.tokens[start:end]
            positions.append(torch.arange(start, end))
            slot_parts.append(self.slots(seq.block_table, start, end))
            last_rows.append(row + n - 1)
            rows = torch.arange(row, row + n)
            if self.share_prefix_attention and seq.shared_len >= self.min_shared:
                group: PrefixGroup | None = seq.group
                while group is not None:  # every level above the sequence
                    segment_rows.setdefault(id(group), (group, []))[1].append(rows)
                    group = group.parent
                first = seq.shared_len // self.block_size  # prefixes are whole blocks
                if n == 1:
                    member_decode.append((row, seq.block_table[first:], end - seq.shared_len))
                else:
                    own = self.slots(seq.block_table, seq.shared_len, end)
                    members.append(PrefillSlice(row, n, own))
            elif n == 1:
                decode.append((row, seq.block_table, end))
            else:
                prefills.append(PrefillSlice(row, n, self.slots(seq.block_table, 0, end)))
            row += n
        logits_rows = [last_rows[i] for i, _ in step.samples]
        dev = self.device
        meta = StepMetadata(
            slot_mapping=torch.cat(slot_parts).to(dev),
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            prefills=tuple(PrefillSlice(p.q_start, p.q_len, p.kv_slots.to(dev)) for p in prefills),
            decode=self._decode_batch(decode),
            segments=tuple(self._segment(g, r) for g, r in segment_rows.values()),
            members=tuple(PrefillSlice(p.q_start, p.q_len, p.kv_slots.to(dev)) for p in members),
            member_decode=self._decode_batch(member_decode),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return input_ids, torch.cat(positions).to(dev), meta

    def _segment(self, group: PrefixGroup, rows: list[torch.Tensor]) -> PrefixSegment:
        start = len(group.parent.tokens) if group.parent else 0
        slots = self.slots(group.blocks, start, len(group.tokens))
        return PrefixSegment(slots.to(self.device), torch.cat(rows).to(self.device))

    def _decode_batch(self, decode: list[tuple[int, list[int], int]]) -> DecodeBatch | None:
        """Entries (row, blocks, positions attended from the first of those blocks)."""
        if not decode:
            return None
        widest = max(len(blocks) for _, blocks, _ in decode)
        # Pad with each sequence's own first block: padding reads written KV, masked out anyway.
        ids = [blocks + [blocks[0]] * (widest - len(blocks)) for _, blocks, _ in decode]
        lengths = torch.tensor([n for _, _, n in decode])
        mask = torch.arange(widest * self.block_size)[None, :] < lengths[:, None]
        return DecodeBatch(
            rows=torch.tensor([r for r, _, _ in decode], dtype=torch.long, device=self.device),
            block_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            mask=mask[:, None, None, :].to(self.device),
            lengths=lengths.to(self.device),
        )

    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Run one step; returns fp32 logits (S, vocab), one row per entry of ``step.samples``."""
        input_ids, positions, meta = self.prepare(step)
        return self.model(input_ids, positions, self.backend, meta)
