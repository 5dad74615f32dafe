"""Continuous batching: every step mixes decode tokens of running sequences with prefill chunks,
bounded by KV memory (blocks) and a prefill-token budget, with preemption by recomputation.

Group-aware: a group's prefix-only sequence is scheduled like any prefill; its members wait until
the prefix KV is ready, then reference the prefix blocks. Members free only their own blocks; the
prefix blocks go back when the group's last member finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import PrefixGroup, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_batched_tokens`` caps prefill tokens per step; decode tokens are bounded by KV
    memory alone. ``max_num_seqs`` caps running sequences (None: memory is the only bound)."""

    max_num_batched_tokens: int = 1024
    max_num_seqs: int | None = None
    max_model_len: int = 2048


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_tokens: list[int]  # new tokens per sequence this step

    @property
    def sampling(self) -> list[bool]:
        """Which sequences sample a token after this step (not prefix-only, prompt complete)."""
        return [
            not s.prefix_only and s.computed + n == len(s.tokens)
            for s, n in zip(self.seqs, self.num_tokens)
        ]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, eos_ids: tuple[int, ...]):
        self.config = config
        self.blocks = blocks
        self.eos_ids = set(eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.groups: list[PrefixGroup] = []  # groups whose prefix blocks are alive
        self.num_preemptions = 0
        self.prefill_tokens_computed = 0
        self._finished_lengths: list[int] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Pick this step's sequences and token counts, allocating the blocks they need."""
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep([], [])
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            # A decode token costs KV memory only; prefill chunks also spend the token budget.
            n = 1 if seq.pending == 1 else min(seq.pending, budget)
            if n == 0:
                continue
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                step.seqs.append(seq)
                step.num_tokens.append(n)
                budget -= n if seq.pending > 1 else 0
        if not preempted:
            self._admit(step, budget)
        return step

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        cap = self.config.max_num_seqs
        reserve = self._reserved_blocks()
        while self.waiting and budget > 0 and (cap is None or len(self.running) < cap):
            seq = self.waiting[0]
            group = seq.group
            if group is not None and not seq.prefix_only and not group.ready:
                break  # members enter together once their prefix KV exists
            if seq.shared_len and not seq.block_table:
                seq.block_table = list(group.blocks)  # type: ignore[union-attr]
                seq.computed = seq.shared_len
            hits = self._cached_prefix(seq)
            computed = max(seq.computed, len(hits) * self.blocks.block_size)
            n = min(len(seq.tokens) - computed, budget)
            need = self.blocks.blocks_for(computed + n) - max(len(seq.block_table), len(hits))
            room = self.blocks.num_available - (0 if not self.running else reserve)
            # Cached blocks nobody references are counted as available; reusing them takes them.
            revived = sum(1 for b in hits if self.blocks.refcount[b] == 0)
            if need + revived > room:
                break
            self.waiting.popleft()
            if hits:
                seq.block_table = self.blocks.lookup(seq.block_hashes[: len(hits)])
                seq.computed = computed
            seq.block_table += self.blocks.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self.blocks.blocks_for(seq.computed + n) - len(seq.block_table)
        if need > self.blocks.num_available:
            return False
        seq.block_table += self.blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's own blocks; it is recomputed when admitted again."""
        self.running.remove(seq)
        self.blocks.release(seq.own_blocks)
        seq.block_table = []
        seq.computed = seq.shared_len
        if seq.shared_len:
            seq.block_table = list(seq.group.blocks)  # type: ignore[union-attr]
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reserved_blocks(self) -> int:
        """Blocks the running sequences are predicted to still need for their outputs.

        The prediction (after Past-Future, LightLLM) is the mean output length of the requests
        finished so far, or ``max_tokens`` when EOS is ignored; it keeps admission from
        overcommitting memory and causing preemption storms.
        """
        mean = (
            sum(self._finished_lengths) / len(self._finished_lengths)
            if self._finished_lengths else 0.0
        )
        total = 0
        for s in self.running:
            if s.prefix_only:
                continue
            expected = s.params.max_tokens if s.params.ignore_eos else min(
                s.params.max_tokens, int(mean) + 1
            )
            future = len(s.tokens) + max(0, expected - s.num_output)
            total += max(0, self.blocks.blocks_for(future) - len(s.block_table))
        return total

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the automatic prefix cache that match this sequence's leading tokens
        (at least one token is always left to compute, so the sequence can sample)."""
        if not self.blocks.enable_prefix_cache or seq.computed or seq.block_table:
            return []
        bs = self.blocks.block_size
        usable = (len(seq.tokens) - 1) // bs
        self._extend_hashes(seq)
        hits = []
        for h in seq.block_hashes[:usable]:
            block = self.blocks.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _extend_hashes(self, seq: Sequence) -> None:
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        seq.block_hashes += BlockManager.chain_hashes(
            seq.tokens, self.blocks.block_size, len(seq.block_hashes), parent
        )

    # -- after the forward pass ---------------------------------------------------------------
    def postprocess(self, step: ScheduledStep, sampled: list[int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, finish sequences; return finished."""
        finished = []
        tokens = iter(sampled)
        for seq, n, samples in zip(step.seqs, step.num_tokens, step.sampling):
            was_prefill = seq.computed < seq.num_prompt
            seq.computed += n
            if was_prefill:
                self.prefill_tokens_computed += min(n, seq.num_prompt - (seq.computed - n))
            self._register_blocks(seq)
            if seq.prefix_only and seq.computed == len(seq.tokens):
                self._prefix_ready(seq)
            elif samples:
                seq.tokens.append(next(tokens))
                reason = self._stop_reason(seq)
                if reason:
                    self.finish(seq, reason)
                    finished.append(seq)
        return finished

    def _register_blocks(self, seq: Sequence) -> None:
        if not self.blocks.enable_prefix_cache:
            return
        self._extend_hashes(seq)
        full = min(seq.computed // self.blocks.block_size, len(seq.block_hashes))
        for i in range(full):
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])

    def _prefix_ready(self, seq: Sequence) -> None:
        group = seq.group
        assert group is not None
        group.blocks = seq.block_table  # the group now holds the prefix-only sequence's refs
        group.ready = True
        self.groups.append(group)
        seq.status = Status.FINISHED
        self.running.remove(seq)

    def _stop_reason(self, seq: Sequence) -> str | None:
        last = seq.tokens[-1]
        if not seq.params.ignore_eos and last in self.eos_ids:
            return "stop"
        if last in seq.params.stop_token_ids:
            return "stop"
        if seq.num_output >= seq.params.max_tokens or len(seq.tokens) >= self.config.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (also called by the engine for stop strings) and free its blocks."""
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.own_blocks)
        self._finished_lengths.append(seq.num_output)
        group = seq.group
        if group is not None and not seq.prefix_only:
            group.remaining -= 1
            if group.remaining == 0:
                self.blocks.release(group.blocks)
                self.groups.remove(group)

    def check_integrity(self) -> None:
        """Block accounting must match the live block tables and group prefixes exactly."""
        holders = [s.own_blocks for s in self.running]
        holders += [s.own_blocks for s in self.waiting if s.block_table and s.own_blocks]
        holders += [g.blocks for g in self.groups]
        self.blocks.check_integrity(holders)
