"""Batched penalties, biases, min_p and min_tokens against a per-row reference on hand-made
logits (vLLM's semantics, written out one token at a time)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from prefixbatch.execution.penalties import LogitsProcessing, PenaltyState, uses_logits_processing
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.sequence import Sequence

VOCAB = 12
EOS = (2,)


def Params(**kwargs) -> SamplingParams:  # noqa: N802 (reads like the class it builds)
    return SamplingParams(max_tokens=16, **kwargs)


def processing(
    params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]
) -> LogitsProcessing | None:
    """The step's processing for rows with these prompts and outputs so far (their penalty
    state made from scratch)."""
    seqs = [
        Sequence(0, pr, len(pr), p, outputs=list(out))
        for p, pr, out in zip(params, prompts, outputs)
    ]
    return LogitsProcessing.build(
        seqs, PenaltyState(VOCAB, torch.device("cpu")), EOS, torch.device("cpu")
    )


def reference_row(
    logits: list[float], p: SamplingParams, prompt: list[int], out: list[int]
) -> list[float]:
    x = list(logits)
    if len(out) < p.min_tokens:
        for t in (*(() if p.ignore_eos else EOS), *p.stop_token_ids):
            x[t] = -math.inf
    for t, b in p.logit_bias:
        x[t] += b
    counts = Counter(out)
    for t in range(VOCAB):
        if t in counts or t in prompt:
            r = p.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    if p.min_p > 0 and p.temperature > 0:
        probs = torch.tensor(x).div(p.temperature).softmax(-1).tolist()
        top = max(probs)
        x = [v if q >= p.min_p * top else -math.inf for v, q in zip(x, probs)]
    return x


def test_hand_made_row():
    """One row computed by hand: [1.0, -2.0, 0.5, 3.0] style values with every feature on."""
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 4.0, 0.0] + [-5.0] * (VOCAB - 6)])
    p = Params(
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=2.0,
        logit_bias={5: 1.0},
        min_tokens=3,
    )
    proc = processing([p], [[0]], [[1, 1, 4]])
    assert proc is not None
    proc.apply(logits)
    # token 0: in the prompt -> 2.0 / 2 = 1.0
    # token 1: twice in the output -> -1.0 * 2 - 0.25 * 2 - 0.5 = -3.0
    # token 2: EOS, but 3 outputs already reach min_tokens=3 -> unchanged 1.0
    # token 4: once in the output -> 4.0 / 2 - 0.25 - 0.5 = 1.25
    # token 5: bias +1 -> 1.0
    assert logits[0, :6].tolist() == [1.0, -3.0, 1.0, 0.5, 1.25, 1.0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, VOCAB)
    ps = [Params(min_tokens=2, stop_token_ids=(7,)), Params(min_tokens=2, ignore_eos=True)]
    proc = processing(ps, [[], []], [[3], []])
    assert proc is not None
    proc.apply(logits)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [2, 7]
    assert not torch.isinf(logits[1]).any()  # EOS is not a stop token under ignore_eos


def test_min_p_keeps_tokens_within_ratio_after_temperature():
    # probabilities at T=1: exp(0) : exp(-1) : exp(-3) -> ratios 1, 0.37, 0.05
    logits = torch.tensor([[0.0, -1.0, -3.0] + [-50.0] * (VOCAB - 3)])
    ps = [Params(min_p=0.1)]
    proc = processing(ps, [[]], [[]])
    assert proc is not None
    proc.apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 1]
    # At T=2 the ratio of token 2 is exp(-1.5) = 0.22 >= 0.1: it stays.
    logits = torch.tensor([[0.0, -1.0, -3.0] + [-50.0] * (VOCAB - 3)])
    proc = processing([Params(min_p=0.1, temperature=2.0)], [[]], [[]])
    assert proc is not None
    proc.apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_batched_matches_reference_on_random_rows(seed: int):
    rng = random.Random(seed)
    rows = 9
    params: list[SamplingParams] = []
    for _ in range(rows):
        kind = rng.randrange(4)
        params.append(
            Params()  # rows that use nothing must stay untouched
            if kind == 0
            else Params(
                presence_penalty=rng.choice([0.0, 0.7, -0.3]),
                frequency_penalty=rng.choice([0.0, 0.4]),
                repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
                logit_bias={rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(kind)},
                min_p=rng.choice([0.0, 0.05, 0.3]),
                min_tokens=rng.choice([0, 4]),
                temperature=rng.choice([0.0, 0.7, 1.0]),
                stop_token_ids=rng.choice([(), (9,)]),
            )
        )
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 6))] for _ in range(rows)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 8))] for _ in range(rows)]
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=gen) * 3
    expected = [
        reference_row(logits[i].tolist(), params[i], prompts[i], outputs[i]) for i in range(rows)
    ]
    proc = processing(params, prompts, outputs)
    assert proc is not None
    proc.apply(logits)
    torch.testing.assert_close(logits, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    for i, p in enumerate(params):
        if not uses_logits_processing(p):
            assert i not in proc.rows.tolist()


def test_nothing_to_do_builds_nothing():
    ps = [Params(temperature=0.0, min_p=0.5), Params()]  # min_p does not change greedy picks
    assert processing(ps, [[], []], [[], []]) is None


def test_logit_bias_outside_vocab_is_refused():
    with pytest.raises(ValueError, match="logit_bias"):
        processing([Params(logit_bias={VOCAB: 1.0})], [[]], [[]])


def test_sampling_params_normalise_and_check_the_new_fields():
    p = SamplingParams(logit_bias={"7": 5, 3: -100})  # OpenAI's JSON keys are strings
    assert p.logit_bias == ((3, -100.0), (7, 5.0))
    hash(p)  # still hashable and picklable as plain tuples
    for bad in (
        dict(logprobs=21),
        dict(n=0),
        dict(presence_penalty=2.5),
        dict(repetition_penalty=0),
        dict(logit_bias={1: 101}),
        dict(min_p=1.5),
        dict(min_tokens=17, max_tokens=16),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_params_with_every_field_survive_pickling():
    """Ray workers receive SamplingParams by pickle."""
    import pickle

    from prefixbatch.grammar_spec import GrammarSpec

    p = SamplingParams(
        n=3,
        logprobs=5,
        prompt_logprobs=1,
        logit_bias={4: 2.0},
        min_tokens=2,
        structured=GrammarSpec.from_request(guided_choice=["a", "b"]),
    )
    assert pickle.loads(pickle.dumps(p)) == p
