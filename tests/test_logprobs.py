"""Log-probabilities: the batched op against a per-row computation, prompt-position alignment."""

from __future__ import annotations

import math

import pytest
import torch

from prefixbatch.execution.logprobs import compute_logprobs, prompt_logprobs
from prefixbatch.outputs import TokenLogprob


def test_chosen_and_top_k_match_per_row_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen) * 4
    tokens = torch.tensor([0, 7, 39, 3, 3])
    out = compute_logprobs(logits, tokens, k=6)
    for i in range(5):
        row = logits[i].double()
        lp = row - math.log(row.exp().sum().item())  # log_softmax written out
        assert out.logprobs[i].item() == pytest.approx(lp[tokens[i]].item(), abs=1e-5)
        order = sorted(range(40), key=lambda t: -lp[t].item())[:6]
        assert out.top_ids[i].tolist() == order
        torch.testing.assert_close(out.top_logprobs[i].double(), lp[order], atol=1e-5, rtol=0)


def test_entries_keep_each_rows_own_top_count():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    entries = compute_logprobs(logits, torch.tensor([1, 2]), k=2).entries([2, 0])
    assert entries[0].token_id == 1 and entries[0].logprob == pytest.approx(math.log(0.3))
    assert [t for t, _ in entries[0].top] == [0, 1]
    assert entries[0].top[0][1] == pytest.approx(math.log(0.5))
    assert entries[1] == TokenLogprob(2, pytest.approx(math.log(0.8)), ())


def test_top_k_range_is_openais():
    with pytest.raises(ValueError, match="0..20"):
        compute_logprobs(torch.zeros(1, 30), torch.tensor([0]), k=21)


def test_prompt_positions_score_the_next_prompt_token():
    prompt = [4, 1, 3, 2]
    logits = torch.randn(4, 6)  # one chunk: positions 0..3; position 3 predicts the first output
    out = prompt_logprobs(logits, prompt, start=0, k=1)
    assert out.token_ids.tolist() == [1, 3, 2]
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref[[0, 1, 2], [1, 3, 2]])
    # Chunked: positions 2..3 of the same prompt cover prompt token 3 only.
    tail = prompt_logprobs(logits[2:], prompt, start=2, k=0)
    assert tail.token_ids.tolist() == [2]
    torch.testing.assert_close(tail.logprobs, ref[[2], [2]])
