"""Continuous batching: every step mixes decode tokens of running sequences with prefill chunks,
bounded by KV memory (blocks) and a prefill-token budget, with preemption by recomputation.

Group-aware: a level's leader is scheduled like any prefill; the level's members (and
sub-levels' leaders) wait until the prefix KV is ready, then reference its blocks. They free only
their own blocks; a level's blocks go back when everything below it has finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..planning.block_hash import chain_hashes
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
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per sequence
    # (index into seqs whose last row's logits are sampled, sequence that receives the token):
    # a request samples for itself; a leader samples for the members whose prompt it completes.
    samples: list[tuple[int, Sequence]] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        if seq.computed + n == len(seq.tokens):
            receivers = seq.leads.dependents if seq.leads else [seq]
            self.samples += [(len(self.seqs), r) for r in receivers]
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, eos_ids: tuple[int, ...]):
        self.config = config
        self.blocks = blocks
        self.eos_ids = set(eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Members and sub-level leaders of levels whose prefix is not computed yet; they move to
        # the front of ``waiting`` together when it is, so other levels' leaders are not blocked.
        self.parked: dict[int, list[Sequence]] = {}
        self.groups: list[PrefixGroup] = []  # levels whose prefix blocks are alive
        self.num_preemptions = 0
        self.prefill_tokens_computed = 0
        self._finished_lengths: list[int] = []

    def add(self, seq: Sequence) -> None:
        if seq.group is not None and not seq.group.ready:
            self.parked.setdefault(id(seq.group), []).append(seq)
        else:
            self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Pick this step's sequences and token counts, allocating the blocks they need."""
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep()
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
                step.add(seq, n)
                budget -= n if seq.pending > 1 else 0
        if not preempted:
            self._admit(step, budget)
        return step

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        cap = self.config.max_num_seqs
        reserve = self._reserved_blocks()
        while self.waiting and budget > 0 and (cap is None or len(self.running) < cap):
            seq = self.waiting[0]
            if not seq.block_table:
                seq.reset_to_prefix()
            hits = self._cached_prefix(seq)
            computed = max(seq.computed, len(hits) * self.blocks.block_size)
            n = min(len(seq.tokens) - computed, budget)
            need = self.blocks.blocks_for(computed + n) - max(len(seq.block_table), len(hits))
            room = self.blocks.num_available - (reserve if self.running else 0)
            # Cached blocks nobody references are counted as available; reusing them takes them.
            revived = sum(1 for b in hits if self.blocks.refcount[b] == 0)
            if need + revived > room:
                break
            # A level starts only when its members can follow it (groups run together), unless
            # nothing runs at all.
            if seq.leads and self.running and self._group_footprint(seq) > room:
                break
            self.waiting.popleft()
            if hits:
                self.blocks.take_cached(hits)
                seq.block_table = hits
                seq.computed = computed
            seq.block_table += self.blocks.allocate(need, seq.last_block)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.add(seq, n)
            budget -= n

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self.blocks.blocks_for(seq.computed + n) - len(seq.block_table)
        if need > self.blocks.num_available:
            return False
        seq.block_table += self.blocks.allocate(need, seq.last_block)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's own blocks; it is recomputed when admitted again."""
        self.running.remove(seq)
        self.blocks.release(seq.own_blocks)
        seq.reset_to_prefix()
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _expected_output(self, seq: Sequence) -> int:
        """Predicted final output length (after Past-Future, LightLLM): ``max_tokens`` when EOS
        is ignored, else the mean output of the requests finished so far (capped)."""
        if seq.params.ignore_eos or not self._finished_lengths:
            return seq.params.max_tokens if seq.params.ignore_eos else 0
        mean = sum(self._finished_lengths) / len(self._finished_lengths)
        return min(seq.params.max_tokens, int(mean) + 1)

    def _reserved_blocks(self) -> int:
        """Blocks the running sequences are predicted to still need for their outputs; keeps
        admission from overcommitting memory and causing preemption storms."""
        total = 0
        for s in self.running:
            if s.leads:
                continue
            future = len(s.tokens) + max(0, self._expected_output(s) - s.num_output)
            total += max(0, self.blocks.blocks_for(future) - len(s.block_table))
        return total

    def _group_footprint(self, leader: Sequence) -> int:
        """Blocks a level needs beyond its leader's chunk to run its members together: each
        waiting member's own prompt plus its predicted output (sub-levels: their prefixes)."""
        group = leader.leads
        assert group is not None
        total = self.blocks.blocks_for(len(group.tokens)) - self.blocks.blocks_for(leader.computed)
        for m in self.parked.get(id(group), []):
            own = m.num_prompt - len(group.tokens) + (0 if m.leads else self._expected_output(m))
            total += self.blocks.blocks_for(own)
        return total

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the automatic prefix cache that match this sequence's leading tokens
        (at least one token is always left to compute, so the sequence can sample). A request
        that scores its prompt computes all of it: cached blocks have no logits."""
        if not self.blocks.enable_prefix_cache or seq.computed or seq.block_table:
            return []
        if seq.params.prompt_logprobs is not None:
            return []
        usable = (len(seq.tokens) - 1) // self.blocks.block_size
        self._extend_hashes(seq)
        return self.blocks.cached_prefix(seq.tokens, seq.block_hashes, usable)

    def _extend_hashes(self, seq: Sequence) -> None:
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        seq.block_hashes += chain_hashes(
            seq.tokens, self.blocks.block_size, len(seq.block_hashes), parent
        )

    # -- after the forward pass ---------------------------------------------------------------
    def postprocess(self, step: ScheduledStep, sampled: list[int]) -> list[Sequence]:
        """Advance computed counts, hand out sampled tokens, finish sequences; return finished.
        Sequences aborted since ``schedule`` (a request that failed during the step, and a
        leader whose every member did) are skipped: their blocks are already free."""
        for seq, n in zip(step.seqs, step.num_tokens):
            if seq.status is Status.FINISHED:
                continue
            self.prefill_tokens_computed += max(
                0, min(seq.computed + n, seq.num_prompt) - seq.computed
            )
            seq.computed += n
            self._register_blocks(seq)
            if seq.leads and seq.computed == len(seq.tokens):
                self._prefix_ready(seq)
        finished = []
        for (_, seq), token in zip(step.samples, sampled):
            if seq.status is Status.FINISHED:
                continue
            seq.tokens.append(token)
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
        bs = self.blocks.block_size
        for i in range(full):
            tokens = seq.tokens[i * bs : (i + 1) * bs]
            self.blocks.register(seq.block_table[i], seq.block_hashes[i], tokens)

    def _prefix_ready(self, leader: Sequence) -> None:
        """The leader's blocks become its level's prefix; the level holds the references."""
        group = leader.leads
        assert group is not None
        group.blocks = leader.block_table
        group.ready = True
        self.groups.append(group)
        self.waiting.extendleft(reversed(self.parked.pop(id(group), [])))
        leader.status = Status.FINISHED
        self.running.remove(leader)

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
        """End a request (also called by the engine for stop strings) and free its blocks; a
        level whose last member finished frees its own blocks and counts itself off its parent."""
        seq.finish_reason = reason
        self._drop(seq)
        self._finished_lengths.append(seq.num_output)
        self._count_off(seq.group)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished request (waiting, parked or running) and free its blocks."""
        seq.finish_reason = "abort"
        group = seq.group
        if group is not None and seq in group.dependents:
            group.dependents.remove(seq)
        self._drop(seq)
        self._count_off(group)

    def _drop(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)  # e.g. a dependent that finished on its first token
        elif seq.group is not None and seq in self.parked.get(id(seq.group), []):
            parked = self.parked[id(seq.group)]
            parked.remove(seq)
            if not parked:
                del self.parked[id(seq.group)]
        seq.status = Status.FINISHED
        self.blocks.release(seq.own_blocks)

    def _count_off(self, group: PrefixGroup | None) -> None:
        """One member or sub-level of ``group`` is done; a level with nothing left frees its
        blocks (or, not computed yet, drops its leader) and counts itself off its parent."""
        while group is not None:
            group.remaining -= 1
            if group.remaining:
                break
            if group.ready:
                self.blocks.release(group.own_blocks)
                self.groups.remove(group)
            elif group.leader is not None:  # every member aborted before the prefix was ready
                self._drop(group.leader)
                self.parked.pop(id(group), None)
            group = group.parent

    def check_integrity(self) -> None:
        """Block accounting must match the live block tables and group prefixes exactly."""
        holders = [s.own_blocks for s in (*self.running, *self.waiting)]
        holders += [g.own_blocks for g in self.groups]
        self.blocks.check_integrity(holders)
