"""The model runner's step inputs, kept incrementally across steps (persistent block tables,
level block ids made once per group, array operations), against a from-scratch rebuild of
every step: the per-sequence Python walk the runner used to make each step. Driven by the real
scheduler without a model, through admissions, preemptions, aborts, groups finishing and
overlap scheduling (steps scheduled before the previous step's tokens are known). The
persistent tables' device copies, kept by row diffs, equal the host arrays after every step."""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import nested_prompts
from prefixbatch.execution.attention.reference import ReferenceBackend
from prefixbatch.execution.attention.resident_table import ResidentTable
from prefixbatch.execution.attention.step import AttentionStep
from prefixbatch.execution.block_tables import BlockTables, PrefixTables
from prefixbatch.execution.kv_cache import KVCache
from prefixbatch.execution.model_runner import ModelRunner, StepInputs
from prefixbatch.execution.upload import upload
from prefixbatch.outputs import Request
from prefixbatch.planning.plan import make_plan
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.block_manager import BlockManager
from prefixbatch.scheduling.request_source import RequestList
from prefixbatch.scheduling.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from prefixbatch.scheduling.sequence import Sequence, Status
from prefixbatch.scheduling.work import WorkStream

BS = 4
EOS = 0


class LevelBackend(ReferenceBackend):
    shares_prefix = True  # the runner describes prefix levels for it


def rebuild(step: ScheduledStep, share: bool, min_shared: int) -> dict[str, object]:
    """The step from scratch: sequences that read levels first, ordered by their chain of
    group ids, each level's rows and blocks found by walking the sequences one by one."""

    def reads(s: Sequence) -> bool:
        return share and s.group is not None and len(s.group.tokens) >= min_shared

    def chain(s: Sequence) -> tuple[int, ...]:
        ids, g = [], s.group
        while g is not None:
            ids.append(g.group_id)
            g = g.parent
        return tuple(reversed(ids))

    keys = [(0, chain(s)) if reads(s) else (1, ()) for s in step.seqs]
    order = sorted(range(len(step.seqs)), key=lambda i: keys[i])
    seqs: list[tuple] = []  # type: ignore[type-arg]
    ids: list[int] = []
    positions: list[int] = []
    levels: dict[int, dict[str, object]] = {}
    last_row: dict[int, int] = {}
    row = 0
    for i in order:
        s, n = step.seqs[i], step.num_tokens[i]
        ctx = s.computed + n
        ids += [*s.prompt.tolist(), *s.outputs][s.computed : ctx]
        positions += range(s.computed, ctx)
        shared = len(s.group.tokens) if reads(s) else 0
        g = s.group if shared else None
        while g is not None:  # every level above the sequence, innermost first
            start = len(g.parent.tokens) if g.parent else 0
            blocks = tuple(g.blocks[start // BS : len(g.tokens) // BS])
            level = levels.setdefault(
                id(g), {"span": (start, len(g.tokens), blocks), "first": len(seqs), "row": row}
            )
            level["last"], level["row_end"] = len(seqs), row + n
            g = g.parent
        seqs.append((row, n, ctx, shared, tuple(s.block_table[: -(-ctx // BS)])))
        last_row[i] = row + n - 1
        row += n
    return {
        "seqs": seqs,
        "levels": [
            (*lvl["span"], lvl["first"], lvl["last"] - lvl["first"] + 1, lvl["row"], lvl["row_end"])  # type: ignore[operator]
            for lvl in levels.values()
        ],
        "ids": ids,
        "positions": positions,
        "logits_rows": [last_row[i] for i, _ in step.samples],
    }


def described(inputs: StepInputs) -> dict[str, object]:
    """What the runner made, in ``rebuild``'s terms."""
    a = inputs.attn
    seqs = []
    for i in range(a.num_seqs):
        ctx = int(a.context_len[i])
        table = tuple(a.full_tables(np.array([i]))[0, : -(-ctx // BS)].tolist())
        seqs.append((int(a.q_start[i]), int(a.q_len[i]), ctx, int(a.shared_len[i]), table))
    return {
        "seqs": seqs,
        "levels": [
            (
                lvl.start,
                lvl.end,
                tuple(np.asarray(lvl.block_ids).tolist()),
                lvl.first_seq,
                lvl.num_seqs,
                lvl.row_start,
                lvl.row_end,
            )
            for lvl in a.levels
        ],  # fmt: skip
        "ids": inputs.input_ids.tolist(),
        "positions": inputs.positions.tolist(),
        "logits_rows": inputs.logits_rows.tolist(),
    }


def check_tables(
    attn: AttentionStep, mirrors: tuple[ResidentTable, ResidentTable], applied: bool
) -> None:
    """Each level's row of the prefix tables holds its block ids (one row per level), and the
    device copies of both tables, brought up to date by the rows written since their last
    update (unless not ``applied``: staged and dropped, as by a failed step), equal them."""
    assert attn.prefix_tables is not None and attn.versions is not None
    for lvl in attn.levels:
        row = attn.prefix_tables[lvl.table_row]
        blocks = np.asarray(lvl.block_ids)
        assert np.array_equal(row[: len(blocks)], blocks) and not row[len(blocks) :].any()
    assert len({lvl.table_row for lvl in attn.levels}) == len(attn.levels)
    versions = attn.versions
    hosts = (attn.tables, versions.tables), (attn.prefix_tables, versions.prefix_tables)
    for mirror, (host, written), key in zip(mirrors, hosts, ("own", "levels")):
        arrays, apply = mirror.stage(host, written, versions.version, key)
        if applied:
            copy = apply(upload(arrays, torch.device("cpu")))
            assert np.array_equal(copy.numpy(), host)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    policy=st.sampled_from(["batchllm", "fcfs-lru", "fcfs"]),
    num_blocks=st.integers(40, 160),
    budget=st.sampled_from([5, 16, 64]),
    overlap=st.booleans(),
    min_shared=st.sampled_from([1, 8, 12]),
)
# A step whose rows are all one token with a 1-token prefill chunk among them (budget 5): the
# chunk's input is a prompt token, not the sequence's last.
@example(seed=111, policy="fcfs-lru", num_blocks=40, budget=5, overlap=False, min_shared=1)
def test_incremental_inputs_equal_a_rebuild_every_step(
    seed: int, policy: str, num_blocks: int, budget: int, overlap: bool, min_shared: int
) -> None:
    rng = random.Random(seed)
    prompts = nested_prompts(rng, system=8, doc=8, docs=3, per_doc=3, vocab=(1, 60))
    prompts += [[rng.randrange(1, 60) for _ in range(rng.randrange(1, 14))] for _ in range(5)]
    rng.shuffle(prompts)
    requests = [
        Request(
            i,
            p,
            SamplingParams(max_tokens=rng.randrange(1, 9), n=rng.choice([1, 1, 1, 2]), seed=i),
        )
        for i, p in enumerate(prompts)
    ]
    plan = None
    if policy == "batchllm":
        plan = make_plan(prompts, [r.params.max_tokens for r in requests], BS)
    stream = WorkStream(RequestList(requests), policy, BS, seed=0, plan=plan)
    sequences = [s for _, seqs in stream for s in seqs]
    blocks = BlockManager(num_blocks, BS, enable_prefix_cache=policy == "fcfs-lru")
    sched = Scheduler(SchedulerConfig(budget, None, 10_000), blocks, (EOS,))
    for s in sequences:
        sched.add(s)
    cache = KVCache(1, num_blocks, BS, 1, 1, torch.float32, torch.device("cpu"))
    runner = ModelRunner(
        None,  # type: ignore[arg-type]
        LevelBackend(cache, 1, 1.0),
        BS,
        torch.device("cpu"),
        share_prefix_attention=policy == "batchllm" or rng.random() < 0.5,
        min_shared=min_shared,
    )
    # Small arrays to start with: both grow (new arrays, every row sent again) during the run.
    runner.tables, runner.prefix_tables = BlockTables(rows=2, width=1), PrefixTables(1, 1)
    mirrors = (ResidentTable(cache.k.device, True), ResidentTable(cache.k.device, True))
    pending: ScheduledStep | None = None
    steps = 0
    while sched.has_work or pending is not None:
        step = sched.schedule()
        if step.seqs:
            inputs = runner.inputs(step)
            got = described(inputs)
            assert got == rebuild(step, runner.share_prefix_attention, runner.min_shared)
            check_tables(inputs.attn, mirrors, applied=rng.random() < 0.8)
            sched.advance(step)
        if pending is not None:  # overlap: the previous step's tokens arrive now
            sched.resolve(pending, [rng.randrange(0, 60) for _ in pending.samples])
            pending = None
        if step.seqs and overlap:
            pending = step
        elif step.seqs:
            sched.resolve(step, [rng.randrange(0, 60) for _ in step.samples])
        running = [s for s in sched.running if s.leads is None]
        if running and rng.random() < 0.1:  # an abort between steps
            sched.abort(rng.choice(running))
        sched.check_integrity()
        steps += 1
        assert steps < 2000, "no progress"
    assert all(s.status is Status.FINISHED for s in sequences)
