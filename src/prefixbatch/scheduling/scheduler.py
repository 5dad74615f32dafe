"""Continuous batching: every step mixes decode tokens of running sequences with prefill chunks,
bounded by KV memory (blocks) and a prefill-token budget, with preemption by recomputation.

Group-aware: a level's leader is scheduled like any prefill; the level's members (and
sub-levels' leaders) wait until the prefix KV is ready, then reference its blocks. They free only
their own blocks; a level's blocks go back when everything below it has finished.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from ..planning.block_hash import chain_hashes
from .block_manager import BlockManager
from .sequence import PrefixGroup, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_num_batched_tokens`` caps prefill tokens per step; decode tokens are bounded by KV
    memory alone. ``max_num_seqs`` caps running sequences (None: memory is the only bound).
    ``embedding_rows``: embedding requests pool every prompt token's hidden state (mean
    pooling), so they take nothing from the prefix cache (cached blocks have no states)."""

    max_num_batched_tokens: int = 1024
    max_num_seqs: int | None = None
    max_model_len: int = 2048
    embedding_rows: bool = False


@dataclass
class ScheduledStep:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per sequence
    # Per sample: the index into seqs whose last row's logits are sampled, and the sequence
    # that receives the token (a request samples for itself; a leader samples for the members
    # whose prompt it completes). Two lists, not a tuple per row: a step then makes no object
    # per row for the garbage collector to track (tuples alive across its collections are
    # promoted, and enough of them set off full collections of the whole heap).
    sample_rows: list[int] = field(default_factory=list)
    receivers: list[Sequence] = field(default_factory=list)
    # Sequences that got their ``batch_index`` in this step (admitted, or admitted again after
    # a preemption): the runner writes their rows of its persistent state from scratch.
    admitted: list[Sequence] = field(default_factory=list)
    # Sequences already running whose block table grew in this step (the runner writes only
    # their new blocks; every other running row's table is as the last step left it).
    grown: list[Sequence] = field(default_factory=list)
    # Where each sample's token goes in its receiver's outputs (``Scheduler.advance``; empty
    # when it was advanced without placeholders: the tokens are appended).
    output_index: list[int] = field(default_factory=list)

    @property
    def samples(self) -> list[tuple[int, Sequence]]:
        """``(sample_rows[j], receivers[j])`` pairs (a new list)."""
        return list(zip(self.sample_rows, self.receivers))

    def add(self, seq: Sequence, n: int) -> None:
        if n == seq.pending:
            receivers = seq.leads.dependents if seq.leads else (seq,)
            self.sample_rows += [len(self.seqs)] * len(receivers)
            self.receivers += receivers
        self.seqs.append(seq)
        self.num_tokens.append(n)


_PLACEHOLDERS: list[int] = []


def _placeholders(n: int) -> list[int]:
    """``[-1, -2, ..., -n]`` and more: the placeholders of a step's samples, made once (a new
    int object per row and step would land wherever the allocator has room)."""
    have = len(_PLACEHOLDERS)
    if have < n:
        _PLACEHOLDERS.extend(range(-1 - have, -1 - max(n, 2 * have), -1))
    return _PLACEHOLDERS


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
        self._finished = 0  # requests finished, and their output tokens in all
        self._finished_total = 0
        self._free_indices: list[int] = []  # batch indices given back, reused first
        self._num_indices = 0
        # Stop-token sets, one per (ignore_eos, stop_token_ids), shared by the sequences.
        self._stop_ids: dict[tuple[bool, tuple[int, ...]], frozenset[int]] = {}

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (parked while its level's prefix is not computed), with its stop
        conditions (``Sequence.stop_ids``, ``Sequence.max_outputs``)."""
        p = seq.params
        key = (p.ignore_eos, tuple(p.stop_token_ids))
        stops = self._stop_ids.get(key)
        if stops is None:
            eos = () if p.ignore_eos else self.eos_ids
            stops = self._stop_ids[key] = frozenset((*eos, *p.stop_token_ids))
        seq.stop_ids = stops
        seq.max_outputs = min(p.max_tokens, self.config.max_model_len - seq.num_prompt)
        if seq.group is not None and not seq.group.ready:
            self.parked.setdefault(id(seq.group), []).append(seq)
        else:
            self.waiting.append(seq)

    @property
    def num_queued(self) -> int:
        """Sequences added and not running: waiting, or parked behind their level's prefix."""
        return len(self.waiting) + sum(map(len, self.parked.values()))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Pick this step's sequences and token counts, allocating the blocks they need."""
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep()
        seqs, num_tokens = step.seqs, step.num_tokens
        sample_rows, receivers = step.sample_rows, step.receivers
        bs = self.blocks.block_size
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            # A decode token costs KV memory only; prefill chunks also spend the token budget.
            pending = seq.pending
            if pending == 1 and seq.room >= 0 and not seq.leads:
                sample_rows.append(len(seqs))  # a decode row with room in its last block
                receivers.append(seq)
                seqs.append(seq)
                num_tokens.append(1)
                continue
            n = 1 if pending == 1 else min(pending, budget)
            if n == 0:
                continue
            if seq.computed + n > len(seq.block_table) * bs:
                while not self._grow(seq, n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue
                step.grown.append(seq)
            step.add(seq, n)
            if pending > 1:
                budget -= n
        if not preempted and self.waiting:
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
            n = min(seq.num_tokens - computed, budget)
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
            if seq.cached < 0:
                seq.cached = min(computed, seq.num_prompt)
            if hits:
                self.blocks.take_cached(hits)
                seq.block_table = hits
                seq.computed = computed
            seq.block_table += self.blocks.allocate(need, seq.last_block)
            seq.room = len(seq.block_table) * self.blocks.block_size - seq.num_tokens
            self._start(seq)
            step.add(seq, n)
            step.admitted.append(seq)
            budget -= n

    def _start(self, seq: Sequence) -> None:
        """``seq`` joins the running sequences, with a batch index."""
        seq.status = Status.RUNNING
        seq.batch_index = self._free_indices.pop() if self._free_indices else self._new_index()
        self.running.append(seq)

    def _new_index(self) -> int:
        self._num_indices += 1
        return self._num_indices - 1

    def _stop(self, seq: Sequence) -> None:
        """``seq`` leaves the running sequences; its batch index goes back."""
        self.running.remove(seq)
        self._free_indices.append(seq.batch_index)
        seq.batch_index = -1

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self.blocks.blocks_for(seq.computed + n) - len(seq.block_table)
        if need > self.blocks.num_available:
            return False
        seq.block_table += self.blocks.allocate(need, seq.last_block)
        seq.room = len(seq.block_table) * self.blocks.block_size - seq.num_tokens
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's own blocks; it is recomputed when admitted again."""
        self._stop(seq)
        self.blocks.release(seq.own_blocks)
        seq.reset_to_prefix()
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _expected_output(self, seq: Sequence) -> int:
        """Predicted final output length (after Past-Future, LightLLM): ``max_tokens`` when EOS
        is ignored, else the mean output of the requests finished so far (capped)."""
        if seq.params.ignore_eos or not self._finished:
            return seq.params.max_tokens if seq.params.ignore_eos else 0
        mean = self._finished_total / self._finished
        return min(seq.params.max_tokens, int(mean) + 1)

    def _reserved_blocks(self) -> int:
        """Blocks the running sequences are predicted to still need for their outputs; keeps
        admission from overcommitting memory and causing preemption storms."""
        total, bs = 0, self.blocks.block_size
        finished = self._finished
        mean = int(self._finished_total / finished) + 1 if finished else 0
        for s in self.running:
            if s.leads:
                continue
            p = s.params
            expected = p.max_tokens if p.ignore_eos else min(p.max_tokens, mean)
            future = s.num_tokens + max(0, expected - len(s.outputs))
            total += max(0, -(-future // bs) - len(s.block_table))
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
        if seq.params.embedding is not None and self.config.embedding_rows:
            return []
        usable = (seq.num_tokens - 1) // self.blocks.block_size
        self._extend_hashes(seq)
        return self.blocks.cached_prefix(
            seq.token_array(0, seq.num_tokens), seq.block_hashes, usable
        )

    def _extend_hashes(self, seq: Sequence) -> None:
        """Hash the full blocks of the sequence's known tokens not hashed yet."""
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        bs = self.blocks.block_size
        # only the tokens after the hashed blocks: copying the whole list cost O(prompt) per
        # filled block
        tokens = seq.token_slice(len(seq.block_hashes) * bs, seq.num_known)
        seq.block_hashes.extend(chain_hashes(tokens, bs, 0, parent))

    # -- after the forward pass ---------------------------------------------------------------
    def postprocess(self, step: ScheduledStep, sampled: list[int]) -> list[Sequence]:
        """``advance`` then ``resolve``: the step's tokens are known; return the finished."""
        self.advance(step)
        return self.resolve(step, sampled)[0]

    def advance(self, step: ScheduledStep, placeholders: bool = True) -> None:
        """The step is running: advance computed counts and make levels whose prefix it
        completes ready. With ``placeholders`` each receiver also gets a placeholder for its
        token (``-1 - j`` for the step's ``j``-th sample), so the next step can be scheduled
        before the tokens are known (the runner takes such a token from the device), and
        ``resolve`` writes the tokens over them; without, ``resolve`` appends them (a step
        completed before the next is scheduled: each receiver's outputs are touched once).
        Sequences that finished since the step was scheduled (the previous step's tokens ended
        them) are left as they are."""
        cache, bs = self.blocks.enable_prefix_cache, self.blocks.block_size
        for seq, n in zip(step.seqs, step.num_tokens):
            if seq.status is Status.FINISHED:
                continue
            if len(seq.outputs) < seq.pending:  # computed < num_prompt: a prefill chunk
                computed = seq.computed
                self.prefill_tokens_computed += min(computed + n, seq.num_prompt) - computed
            seq.pending -= n
            if cache and seq.computed >= (seq.registered + 1) * bs:  # a block filled
                self._register_blocks(seq)
            if seq.leads and not seq.pending:
                self._prefix_ready(seq)
        if not placeholders:
            return
        at = step.output_index
        made = _placeholders(len(step.receivers))
        for j, seq in enumerate(step.receivers):
            if seq.status is Status.FINISHED:
                at.append(-1)  # ``resolve`` skips it
                continue
            outputs = seq.outputs
            at.append(len(outputs))  # a small int: no new object
            placeholder = made[j]
            outputs.append(placeholder)
            seq.pending += 1
            seq.room -= 1
            seq.last_token = placeholder

    def resolve(
        self, step: ScheduledStep, sampled: list[int]
    ) -> tuple[list[Sequence], tuple[list[Sequence], list[int]]]:
        """Write an advanced step's sampled tokens over their placeholders, or append them
        when it was advanced without, and finish the sequences they end (a sequence that ended
        or was aborted since gets nothing; one that ends here drops what a later step computed
        after it). Returns the finished, and the sequences that got their token with each
        token's index in their outputs (two lists)."""
        finished: list[Sequence] = []
        got: list[Sequence] = []
        where: list[int] = []
        cache, bs = self.blocks.enable_prefix_cache, self.blocks.block_size
        done = Status.FINISHED
        placed = step.output_index or itertools.repeat(-1)
        for seq, token, k in zip(step.receivers, sampled, placed):
            if seq.status is done:
                continue
            outputs = seq.outputs
            if k < 0:  # no placeholder: the token goes at the end
                k = len(outputs)
                outputs.append(token)
                seq.pending += 1
                seq.room -= 1
                seq.last_token = token
            else:
                outputs[k] = token
                if k == len(outputs) - 1:
                    seq.last_token = token
            got.append(seq)
            where.append(k)
            if cache and seq.computed >= (seq.registered + 1) * bs:  # a block filled
                self._register_blocks(seq)
            if token in seq.stop_ids:
                reason = "stop"
            elif k + 1 >= seq.max_outputs:
                reason = "length"
            else:
                continue
            self.finish(seq, reason, seq.num_prompt + k)
            finished.append(seq)
        return finished, (got, where)

    def _register_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly filled, computed blocks into the prefix cache: each block
        is hashed and registered once, when it fills and its tokens are known, not on every
        step."""
        full = min(seq.computed, seq.num_known) // self.blocks.block_size
        if full <= seq.registered:
            return
        self._extend_hashes(seq)
        bs = self.blocks.block_size
        full = min(full, len(seq.block_hashes))
        for i in range(seq.registered, full):
            tokens = seq.token_array(i * bs, (i + 1) * bs)
            self.blocks.register(seq.block_table[i], seq.block_hashes[i], tokens)
        seq.registered = max(seq.registered, full)

    def _prefix_ready(self, leader: Sequence) -> None:
        """The leader's blocks become its level's prefix; the level holds the references."""
        group = leader.leads
        assert group is not None
        group.blocks = leader.block_table
        group.ready = True
        self.groups.append(group)
        self.waiting.extendleft(reversed(self.parked.pop(id(group), [])))
        self._stop(leader)
        leader.status = Status.FINISHED

    def finish(self, seq: Sequence, reason: str, last: int | None = None) -> None:
        """End a request (also called by the engine for stop strings) and free its blocks; a
        level whose last member finished frees its own blocks and counts itself off its parent.
        ``last``: the index of its last token (what a later step scheduled after it is
        dropped; None: the tokens as they are)."""
        if last is not None:
            assert last >= seq.num_prompt - 1, "a finish inside the prompt"
            computed = seq.computed
            del seq.outputs[last + 1 - seq.num_prompt :]
            seq.computed = min(computed, seq.num_tokens)
            seq.last_token = seq.tail_token
        seq.finish_reason = reason
        self._drop(seq)
        self._finished += 1
        self._finished_total += seq.num_output
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
            self._stop(seq)
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
        """Block accounting must match the live block tables and group prefixes exactly, each
        live sequence's ``last_token`` its last token, and each running one's ``room`` its
        table's slots beyond its tokens."""
        live = (*self.running, *self.waiting, *(s for p in self.parked.values() for s in p))
        stale = [s.seq_id for s in live if s.last_token != s.tail_token]
        assert not stale, f"sequences {stale} hold a stale last_token"
        bs = self.blocks.block_size
        wrong = [s.seq_id for s in self.running if s.room != len(s.block_table) * bs - s.num_tokens]
        assert not wrong, f"sequences {wrong} hold a wrong room"
        holders = [s.own_blocks for s in (*self.running, *self.waiting)]
        holders += [g.own_blocks for g in self.groups]
        self.blocks.check_integrity(holders)
