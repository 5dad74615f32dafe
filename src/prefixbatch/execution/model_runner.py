"""Turns a scheduled step (plain Python sequences) into tensors, runs the model, returns logits.

The only place where bookkeeping becomes tensors: token ids, positions, KV slots and the
attention metadata for the step.
"""

from __future__ import annotations

import torch

from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import Sequence
from .attention.backend import (
    AttentionBackend,
    DecodeBatch,
    PrefillSlice,
    SharedGroup,
    StepMetadata,
)
from .models.decoder import DecoderModel


class ModelRunner:
    """Owns the model and the attention backend (and through it the KV cache)."""

    def __init__(self, model: DecoderModel, backend: AttentionBackend, block_size: int,
                 device: torch.device, share_prefix_attention: bool = False) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.share_prefix_attention = share_prefix_attention

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence with block table ``table``."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def prepare(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        logits_rows: list[int] = []
        prefills: list[PrefillSlice] = []
        decode: list[tuple[int, torch.Tensor]] = []
        members: dict[int, list[tuple[Sequence, PrefillSlice]]] = {}
        row = 0
        for seq, n, samples in zip(step.seqs, step.num_tokens, step.sampling):
            start, end = seq.computed, seq.computed + n
            ids += seq.tokens[start:end]
            positions.append(torch.arange(start, end))
            slot_parts.append(self.slots(seq.block_table, start, end))
            if samples:
                logits_rows.append(row + n - 1)
            if self.share_prefix_attention and seq.shared_len:
                # Only the member's own KV (after the prefix); the prefix is read per group.
                own = self.slots(seq.block_table, seq.shared_len, end)
                members.setdefault(id(seq.group), []).append((seq, PrefillSlice(row, n, own)))
            elif n == 1:
                decode.append((row, self.slots(seq.block_table, 0, end)))
            else:
                prefills.append(PrefillSlice(row, n, self.slots(seq.block_table, 0, end)))
            row += n
        meta = StepMetadata(
            slot_mapping=torch.cat(slot_parts).to(self.device),
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            prefills=tuple(self._to_device(p) for p in prefills),
            decode=self._decode_batch(decode),
            groups=tuple(self._group(m) for m in members.values()),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return input_ids, torch.cat(positions).to(self.device), meta

    def _to_device(self, s: PrefillSlice) -> PrefillSlice:
        return PrefillSlice(s.q_start, s.q_len, s.kv_slots.to(self.device))

    def _decode_batch(self, decode: list[tuple[int, torch.Tensor]]) -> DecodeBatch | None:
        if not decode:
            return None
        lengths = torch.tensor([len(s) for _, s in decode])
        longest = int(lengths.max())
        slots = torch.empty(len(decode), longest, dtype=torch.long)
        for i, (_, s) in enumerate(decode):
            slots[i, : len(s)] = s
            slots[i, len(s) :] = s[0]  # padding reads a written slot (masked out anyway)
        mask = torch.arange(longest)[None, :] < lengths[:, None]  # (B, Lmax)
        return DecodeBatch(
            rows=torch.tensor([r for r, _ in decode], dtype=torch.long, device=self.device),
            kv_slots=slots.to(self.device),
            mask=mask[:, None, None, :].to(self.device),
        )

    def _group(self, members: list[tuple[Sequence, PrefillSlice]]) -> SharedGroup:
        seq = members[0][0]
        prefix = self.slots(seq.block_table, 0, seq.shared_len).to(self.device)
        slices = tuple(self._to_device(s) for _, s in members)
        rows = torch.cat([torch.arange(s.q_start, s.q_start + s.q_len) for s in slices])
        return SharedGroup(prefix, slices, rows.to(self.device))

    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Run one step; returns fp32 logits (S, vocab) for the sampling sequences, in order."""
        input_ids, positions, meta = self.prepare(step)
        return self.model(input_ids, positions, self.backend, meta)
