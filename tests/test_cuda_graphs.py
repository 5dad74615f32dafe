"""The decode graph runner: buckets, padding and the backend hooks, checked on a toy paged
decode step against running the same steps unpadded; captured graphs when CUDA is present."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prefixbatch.execution.cuda_graphs import DecodeGraphRunner, batch_buckets, bucket_for

BLOCK, BLOCKS, WIDTH, DIM, VOCAB = 4, 24, 6, 8, 32
SCRATCH = (BLOCKS - 1) * BLOCK  # the last block takes the padding rows' writes


@dataclass(frozen=True)
class ToyMeta:
    slots: torch.Tensor  # (B,) slot each row's new KV goes to
    block_table: torch.Tensor  # (B, NB) blocks of each row's context
    context_lens: torch.Tensor  # (B,) positions each row attends


class ToyDecoder:
    """One attention layer over a paged pool: writes each row's key, attends its context."""

    def __init__(self, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.randn(VOCAB, DIM, generator=gen).to(device)
        self.head = torch.randn(DIM, VOCAB, generator=gen).to(device)
        self.pool = torch.randn(BLOCKS * BLOCK, DIM, generator=gen).to(device)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, meta: ToyMeta) -> torch.Tensor:
        x = self.embed[ids] + 0.01 * pos[:, None]  # (B, D)
        self.pool.index_copy_(0, meta.slots, x)
        offsets = torch.arange(BLOCK, device=ids.device)
        slots = (meta.block_table[:, :, None] * BLOCK + offsets).flatten(1)  # (B, NB * BLOCK)
        kv = self.pool[slots]  # (B, L, D)
        attended = torch.arange(slots.shape[1], device=ids.device) < meta.context_lens[:, None]
        scores = (kv @ x[:, :, None]).squeeze(-1).masked_fill(~attended, float("-inf"))
        return (scores.softmax(-1)[:, :, None] * kv).sum(1) @ self.head


class ToyHooks:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def graph_buffers(self, bucket: int) -> ToyMeta:
        long = dict(dtype=torch.long, device=self.device)
        return ToyMeta(
            torch.full((bucket,), SCRATCH, **long),
            torch.zeros(bucket, WIDTH, **long),
            torch.ones(bucket, **long),
        )

    def fill(self, static: ToyMeta, meta: ToyMeta, num_rows: int) -> None:
        width = meta.block_table.shape[1]
        static.slots[:num_rows].copy_(meta.slots)
        static.slots[num_rows:].fill_(SCRATCH)
        static.block_table[:num_rows, :width].copy_(meta.block_table)
        static.block_table[num_rows:].zero_()
        static.context_lens[:num_rows].copy_(meta.context_lens)
        static.context_lens[num_rows:].fill_(1)


def decode_step(n: int, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """n sequences, each owning blocks (2i, 2i+1) wrapped into the pool, decoding its token at
    position 3 + step (its block table is as wide as the widest context of the step)."""
    gen = torch.Generator().manual_seed(100 * n + step)
    ids = torch.randint(0, VOCAB, (n,), generator=gen)
    lens = torch.randint(1, 2 * BLOCK, (n,), generator=gen)
    own = torch.tensor([[(2 * i) % (BLOCKS - 2), (2 * i) % (BLOCKS - 2) + 1] for i in range(n)])
    pos = lens - 1
    slots = own.gather(1, (pos // BLOCK)[:, None]).squeeze(1) * BLOCK + pos % BLOCK
    meta = ToyMeta(slots.to(device), own.to(device), lens.to(device))
    return ids.to(device), pos.to(device), meta


def test_buckets_are_powers_of_two_up_to_the_largest():
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert batch_buckets(1) == (1,)
    buckets = batch_buckets(100)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 64, 65, 100, 101)] == [
        1, 2, 4, 8, 64, 100, 100, None,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        batch_buckets(0)


def check_runner_matches_unpadded(device: torch.device, use_graphs: bool) -> None:
    eager, padded = ToyDecoder(device), ToyDecoder(device)
    runner = DecodeGraphRunner(padded.forward, ToyHooks(device), 12, device, use_graphs)
    if use_graphs:
        runner.capture()
        assert runner.captured == (1, 2, 4, 8, 12)
        padded.pool.copy_(eager.pool)  # the warm-up and capture wrote the scratch block
    for step, n in enumerate([1, 3, 5, 8, 2, 9, 12, 13, 7]):
        ids, pos, meta = decode_step(n, step, device)
        expect = eager.forward(ids, pos, meta)
        got = runner.run(ids, pos, meta)
        assert got.shape == (n, VOCAB)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        # Real rows wrote the same KV; padding wrote only the scratch block.
        torch.testing.assert_close(padded.pool[:SCRATCH], eager.pool[:SCRATCH])


def test_padded_static_buffers_give_the_unpadded_results_on_the_cpu():
    check_runner_matches_unpadded(torch.device("cpu"), use_graphs=False)


def test_graphs_refuse_to_run_before_capture_and_off_cuda():
    cpu = torch.device("cpu")
    runner = DecodeGraphRunner(ToyDecoder(cpu).forward, ToyHooks(cpu), 4, cpu, use_graphs=True)
    with pytest.raises(RuntimeError, match="capture"):
        runner.run(*decode_step(3, 0, cpu))
    assert DecodeGraphRunner(ToyDecoder(cpu).forward, ToyHooks(cpu), 4, cpu).use_graphs is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_replay_the_eager_results():
    check_runner_matches_unpadded(torch.device("cuda"), use_graphs=True)
