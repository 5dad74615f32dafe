"""Sampling: the device sampler's distribution, filters and seeded noise; in the engine, seeds
reproduce, top-k=1 is greedy, stop strings cut."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.sampler import (
    SamplingTensors,
    as_int64,
    exponential_noise,
    filter_logits,
    mix64,
    row_keys,
    sample,
)

MASK = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """splitmix64's finalizer on Python ints (the published algorithm, unsigned 64-bit)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def tensors(params: list[SamplingParams], seeds: list[int], index: list[int]) -> SamplingTensors:
    return SamplingTensors.build(params, seeds, index, torch.device("cpu"))


def test_int64_hash_equals_unsigned_splitmix64():
    values = [0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, -7]
    got = mix64(torch.tensor([as_int64(v) for v in values], dtype=torch.int64)).tolist()
    assert got == [as_int64(splitmix64(v & MASK)) for v in values]
    # The noise of token t is element t+1 of the row key's stream: the same bits in Python.
    key = row_keys(torch.tensor([as_int64(2**64 - 3)]), torch.tensor([4]))
    gamma = 0x9E3779B97F4A7C15
    expect = splitmix64((splitmix64((2**64 - 3) & MASK) + 5 * gamma) & MASK)
    assert key.item() == as_int64(expect)
    noise = exponential_noise(key, 3)[0].tolist()
    for t in range(3):
        bits = splitmix64((expect + (t + 1) * gamma) & MASK)
        assert noise[t] == pytest.approx(-math.log(((bits >> 11) + 0.5) * 2.0**-53), rel=1e-6)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_follow_the_filtered_softmax():
    """20,000 draws (distinct output indices of one seed) against softmax(logits / T): the
    chi-square statistic stays under the 0.1% critical value (7 degrees of freedom: 24.3)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n, temp = 20_000, 0.8
    params = [SamplingParams(temperature=temp, seed=7)] * n
    tokens = sample(logits.expand(n, -1), tensors(params, [7] * n, list(range(n))))
    counts = torch.bincount(tokens, minlength=8).double()
    assert chi_square(counts, (logits / temp).softmax(-1).double()) < 24.3
    # Top-k 4 then top-p 0.8 keeps the first three tokens here; draws follow their renormalised
    # softmax (2 degrees of freedom: 13.8) and never leave them.
    kept = (logits[:4] / temp).softmax(-1)
    assert kept[:2].sum() < 0.8 <= kept[:3].sum()
    params = [SamplingParams(temperature=temp, top_k=4, top_p=0.8)] * n
    tokens = sample(logits.expand(n, -1), tensors(params, [11] * n, list(range(n))))
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[3:].sum() == 0
    assert chi_square(counts[:3], (logits[:3] / temp).softmax(-1).double()) < 13.8


def reference_keep(row: list[float], top_k: int, top_p: float) -> list[bool]:
    """The filters one row at a time in plain Python."""
    ordered = sorted(row, reverse=True)
    k = top_k if 0 < top_k < len(row) else len(row)
    keep = [x >= ordered[k - 1] for x in row]
    if top_p < 1.0:
        kept = sorted((x for x, ok in zip(row, keep) if ok), reverse=True)
        weights = [math.exp(x - kept[0]) for x in kept]
        total, before, cut = sum(weights), 0.0, kept[-1]
        for x, w in zip(kept, weights):
            if before >= top_p:
                break
            cut, before = x, before + w / total
        keep = [ok and x >= cut for x, ok in zip(row, keep)]
    return keep


def test_filter_masks_equal_a_per_row_reference():
    rng = random.Random(0)
    rows, vocab = 64, 50
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    top_k = [rng.choice([0, 1, 2, 7, 49, 50, 80]) for _ in range(rows)]
    top_p = [rng.choice([1.0, 0.95, 0.5, 0.1, 1e-6]) for _ in range(rows)]
    masked = filter_logits(logits, torch.tensor(top_k), torch.tensor(top_p))
    for i in range(rows):
        expect = reference_keep(logits[i].tolist(), top_k[i], top_p[i])
        assert (~torch.isinf(masked[i])).tolist() == expect, (top_k[i], top_p[i])
        assert torch.equal(masked[i][torch.tensor(expect)], logits[i][torch.tensor(expect)])


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top_2 = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isinf(top_2[0]).tolist() == [False, False, True, True, True]
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, torch.tensor([0]), torch.tensor([0.8]))[0])
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:2].sum() >= 0.8 > probs[:1].sum()


def test_seeded_row_is_the_same_whatever_its_batch():
    vocab = 64
    gen = torch.Generator().manual_seed(1)
    mine = torch.randn(vocab, generator=gen)
    p = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=1234)
    for index in range(5):
        alone = sample(mine[None], tensors([p], [1234], [index])).item()
        others = [SamplingParams(temperature=t, top_p=0.7) for t in (0.0, 0.5, 1.0, 2.0)]
        for at in (0, 2, 4):
            params = others[:at] + [p] + others[at:]
            logits = torch.randn(5, vocab, generator=gen)
            logits[at] = mine
            seeds = [99, 5, 6, 7, 8]
            seeds[at] = 1234
            index_list = [3, 0, 9, 1, 2]
            index_list[at] = index
            assert sample(logits, tensors(params, seeds, index_list))[at].item() == alone
    # The seed and the output index both change the draw (flat logits: the noise decides).
    flat = torch.zeros(1, 1000)
    draws = {sample(flat, tensors([p], [s], [i])).item() for s in (1, 2, 3) for i in range(4)}
    assert len(draws) >= 10


def test_greedy_rows_are_the_argmax_beside_sampled_rows():
    logits = torch.randn(12, 100, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0.0) if i % 3 == 0 else SamplingParams(temperature=5.0)
        for i in range(12)
    ]
    tokens = sample(logits, tensors(params, list(range(12)), [0] * 12))
    argmax = logits.argmax(-1)
    greedy = torch.tensor([i % 3 == 0 for i in range(12)])
    assert torch.equal(tokens[greedy], argmax[greedy])
    assert not torch.equal(tokens[~greedy], argmax[~greedy])  # T=5 over 100 tokens
    all_greedy = [SamplingParams(temperature=0.0)] * 12
    assert torch.equal(sample(logits, tensors(all_greedy, [0] * 12, [0] * 12)), argmax)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_draws_on_cuda_and_cpu():
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.9, top_k=50 * i, top_p=0.95) for i in range(16)]
    seeds, index = list(range(100, 116)), list(range(16))
    cpu = sample(logits, tensors(params, seeds, index))
    cuda = SamplingTensors.build(params, seeds, index, torch.device("cuda"))
    assert sample(logits.cuda(), cuda).cpu().tolist() == cpu.tolist()


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=32 * 2**20)


def test_same_seed_same_tokens_whatever_the_batch(llm):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(12, seed=5)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate([prompts[0]], params)[0].output_token_ids
    batched = llm.generate(prompts, params)[0].output_token_ids
    again = llm.generate(prompts[:1] * 3, params)
    assert alone == batched
    assert all(o.output_token_ids == alone for o in again)
    other = llm.generate([prompts[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=99))
    assert other[0].output_token_ids != alone  # the seed matters (12 tokens of 512)


def test_unseeded_requests_are_deterministic_per_job(llm):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(6, seed=6)
    params = SamplingParams(max_tokens=8, temperature=1.0)
    a = [o.output_token_ids for o in llm.generate(prompts, params)]
    b = [o.output_token_ids for o in llm.generate(prompts, params)]
    assert a == b and len({tuple(x) for x in a}) > 1


def test_top_k_one_equals_greedy(llm):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(10, seed=7)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    topk = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3))
    assert [o.output_token_ids for o in greedy] == [o.output_token_ids for o in topk]


def test_stop_strings_cut_the_text(llm):  # type: ignore[no-untyped-def]
    prompt = shared_prefix_prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    words = full.text.split()
    stop = words[3]
    cut = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.output_token_ids) < len(full.output_token_ids)


def test_stop_token_ids_and_max_tokens(llm):  # type: ignore[no-untyped-def]
    prompt = shared_prefix_prompts(1, seed=9)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert full.finish_reason == "length" and len(full.output_token_ids) == 10
    stop_id = full.output_token_ids[4]
    first = full.output_token_ids.index(stop_id)
    cut = llm.generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_id,))
    )[0]
    assert cut.output_token_ids == full.output_token_ids[: first + 1]
    assert cut.finish_reason == "stop"
