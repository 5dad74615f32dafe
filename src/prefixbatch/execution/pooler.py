"""Pool embedding requests' hidden states, step by step (``pooling.py`` says what pooling is).

An embedding request is a prefill with no sampling: the step that computes its last prompt
token is where the scheduler would sample it (``ScheduledStep.samples``), and the runner returns
the final-norm hidden states of those rows instead of logits. Shared prefixes stay computed once
(BatchLLM's levels), which is exact because the attention is causal: a prefix token's hidden
state does not depend on what follows it.

- ``last`` pooling reads only the sampled rows: a request's last token (a member whose prompt is
  exactly a level's prefix takes the row of the prefix's last token, from the level's leader).
- ``mean`` pooling needs every prompt token. Each sequence sums the rows it computes itself,
  chunk by chunk (a chunk that starts at the sequence's shared prefix starts the sum afresh: its
  first chunk, or its first after a preemption); a level's leader computes only the level's own
  tokens, and its sum is kept for the level. A request's mean is its own sum plus the sums of
  every level above it, over its prompt length: each prefix token's state is computed once per
  level and added to every member's sum, never recomputed per member.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from ..pooling import PoolingConfig
from ..scheduling.scheduler import ScheduledStep
from ..scheduling.sequence import PrefixGroup, Sequence


class StepPooler:
    """Per-engine pooling state: running sums of sequences and levels (mean pooling)."""

    def __init__(self, config: PoolingConfig) -> None:
        self.config = config
        self._sums: dict[Sequence, torch.Tensor] = {}  # rows computed so far, per sequence
        self._levels: WeakKeyDictionary[PrefixGroup, torch.Tensor] = WeakKeyDictionary()

    def every_row(self, step: ScheduledStep) -> range:
        """The step's sequences (indices into ``step.seqs``) whose every row the pooling reads,
        after the sampled rows (``ModelRunner.execute``'s ``every_row``)."""
        return range(len(step.seqs)) if self.config.every_row else range(0)

    def pool(
        self, step: ScheduledStep, hidden: torch.Tensor
    ) -> list[tuple[Sequence, torch.Tensor]]:
        """The requests the step completes, each with its pooled state (hidden,) fp32, not
        normalised; ``hidden``: the runner's rows for ``step`` (its samples' rows, then
        ``every_row``'s). Call before the scheduler advances the step."""
        samples = step.samples
        if not self.config.every_row:
            return [(receiver, hidden[j]) for j, (_, receiver) in enumerate(samples)]
        row = len(samples)
        for seq, n in zip(step.seqs, step.num_tokens):
            chunk = hidden[row : row + n].sum(dim=0)
            row += n
            if seq.computed == seq.shared_len or seq not in self._sums:
                self._sums[seq] = chunk
            else:
                self._sums[seq] += chunk
            if seq.leads is not None and seq.computed + n == seq.num_tokens:
                self._levels[seq.leads] = self._sums.pop(seq)
        pooled = []
        for _, receiver in samples:
            total = self._sums.pop(receiver, None)
            group = receiver.group
            while group is not None:
                level = self._levels[group]
                total = level.clone() if total is None else total + level
                group = group.parent
            assert total is not None, "a request with no token pooled"
            pooled.append((receiver, total / receiver.num_prompt))
        return pooled

    def forget(self, seq: Sequence) -> None:
        """Drop an aborted sequence's running sum."""
        self._sums.pop(seq, None)
