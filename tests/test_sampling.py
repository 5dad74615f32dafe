"""Sampling: seeds reproduce, top-k=1 is greedy, top-p keeps the nucleus, stop strings cut."""

from __future__ import annotations

import pytest
import torch

from conftest import shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.sampler import filter_logits


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), block_size=8, kv_cache_memory=32 * 2**20)


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


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True, True]
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:2].sum() >= 0.8 > probs[:1].sum()


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


def test_stop_string_on_the_last_allowed_token_finishes_with_stop(llm):  # type: ignore[no-untyped-def]
    prompt = shared_prefix_prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    words = full.text.split()
    k = next(i for i, w in enumerate(words) if i >= 2 and w not in " ".join(words[:i]))
    outs = llm.generate(
        [prompt] * 2,
        [SamplingParams(max_tokens=m, temperature=0, stop=[words[k]]) for m in (k + 1, k + 2)],
    )
    assert [o.finish_reason for o in outs] == ["stop", "stop"]  # max_tokens == stop position
    assert outs[0].text == outs[1].text == full.text[: full.text.index(words[k])]
    assert len(outs[0].output_token_ids) == len(outs[1].output_token_ids) == k + 1


def test_include_stop_str_and_min_tokens(llm):  # type: ignore[no-untyped-def]
    prompt = shared_prefix_prompts(1, seed=8)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    stop = full.text.split()[3]
    kept = llm.generate(
        [prompt],
        SamplingParams(max_tokens=12, temperature=0, stop=[stop], include_stop_str_in_output=True),
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    first = full.output_token_ids[0]
    late = llm.generate(
        [prompt],
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(first,), min_tokens=3),
    )[0]
    assert first not in late.output_token_ids[:3] and len(late.output_token_ids) >= 3


def test_params_list_of_another_length_raises(llm):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(3, seed=1)
    sp = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="3 prompts and 2 SamplingParams"):
        llm.generate(prompts, [sp, sp])
    with pytest.raises(ValueError, match="token id 512 is outside the model's vocabulary"):
        llm.generate([[5, 512]], sp)
