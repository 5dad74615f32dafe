"""The lm_head's reused output buffer (``execution/lm_head.py``): the same logits as
``F.linear``, the buffer reused and grown, and the engine's outputs unchanged when every step's
logits go through it (the engine consumes a step's logits before the next step's forward)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_overlap import batch, run

from prefixbatch import LLM
from prefixbatch.engine import LLMEngine
from prefixbatch.execution import lm_head
from prefixbatch.execution.lm_head import LMHead
from prefixbatch.execution.packed_linear import onednn_available


@pytest.fixture
def always_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output of more than 0 bytes goes through the buffer."""
    monkeypatch.setattr(lm_head, "MMAP_THRESHOLD", 0)


@pytest.mark.parametrize("packed", [False, True])
def test_buffered_logits_equal_f_linear(always_buffered, packed):  # type: ignore[no-untyped-def]
    if packed and not onednn_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    head = LMHead(48, 300)
    weight = head.weight.detach().clone()
    if packed:
        head.pack()
        assert head.packed is not None and head.weight.numel() == weight.numel()
    with torch.inference_mode():
        for rows in (0, 5, 37, 3):
            x = torch.randn(rows, 48)
            got = head(x)
            assert got.shape == (rows, 300)
            torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_the_buffer_is_reused_and_grows_to_the_largest_output(always_buffered):  # type: ignore[no-untyped-def]
    head = LMHead(16, 64)
    with torch.inference_mode():
        first = head(torch.randn(4, 16))
        again = head(torch.randn(4, 16))
        assert first.data_ptr() == again.data_ptr()  # the same memory, written again
        grown = head(torch.randn(9, 16))
        smaller = head(torch.randn(2, 16))
        assert head._buffer.numel() == 9 * 64
        head(torch.randn(10, 16))  # grows by a quarter at least: ramps take few allocations
    assert head._buffer.numel() == 9 * 64 * 5 // 4
    assert smaller.data_ptr() == grown.data_ptr()


def test_small_outputs_are_fresh_tensors() -> None:
    head = LMHead(16, 64)  # 4 x 64 fp32 is far below the mmap threshold
    with torch.inference_mode():
        a, b = head(torch.randn(4, 16)), head(torch.randn(4, 16))
    assert a.data_ptr() != b.data_ptr() and head._buffer.numel() == 0


def test_a_tied_head_stays_tied_when_packed() -> None:
    embed = torch.nn.Embedding(64, 16)
    head = LMHead(16, 64)
    head.weight = embed.weight
    if onednn_available():
        head.pack()
    assert head.weight is embed.weight


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_outputs_are_unchanged_through_the_buffer(tiny_models, monkeypatch, overlap):  # type: ignore[no-untyped-def]
    """Greedy, sampled, penalties, logprobs, prompt logprobs, n > 1, stop strings and a grammar:
    the same outputs with every step's logits in the reused buffer as with fresh tensors (the
    plain path, whose fresh logits come from the same GEMM: equal bit for bit)."""
    llm = LLM(
        str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20,
        kernels="torch",
    )  # fmt: skip
    sync = llm.engine
    engine = LLMEngine(replace(sync.config, overlap_schedule=overlap), sync.loaded)
    requests = batch(seed=2)
    expected = run(engine, requests, None)
    monkeypatch.setattr(lm_head, "MMAP_THRESHOLD", 0)
    assert run(engine, requests, None) == expected
    assert sync.worker.model.lm_head._buffer.numel() > 0  # the buffer was used
