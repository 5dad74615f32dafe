"""Structured output's cost: a labelling job (sentiment label + short reason) on the default
model, constrained by a JSON schema (an enum field and a short string), against the same job
free, same prompts, greedy. The issue's target: the schema run within 15% of the free run's
throughput.

    python bench/structured_output.py [--requests 128] [--max-tokens 48]

A free run stops where the model likes, so its outputs differ in length from the schema run's
and tokens per second would compare different work (prefill shares, batch sizes). The
comparison run is therefore free text of exactly the schema run's lengths (each request's
``max_tokens`` set to its schema output's length, EOS ignored): the same forward passes, so the
difference is the grammar's cost. The free run with its own lengths is printed for reference.
The schema run also reports how many outputs parse and validate (all must, unless cut by
max_tokens).
"""

from __future__ import annotations

import argparse
import json
import random

import jsonschema
from common import machine, table, timed

from prefixbatch import LLM, SamplingParams
from prefixbatch.grammar_spec import GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "reason": {"type": "string", "maxLength": 60},
    },
    "required": ["label", "reason"],
    "additionalProperties": False,
}
SUBJECTS = ["the hotel", "the film", "the phone", "the meal", "the course", "the service"]
VERDICTS = ["was wonderful", "was a waste of money", "was fine, nothing special", "broke at once"]


def chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    system = (
        "You label customer reviews. Answer with a JSON object with a sentiment label "
        "(positive, negative or neutral) and a short reason."
    )
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Review: {rng.choice(SUBJECTS)} {rng.choice(VERDICTS)}."},
        ]
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    llm = LLM(kv_cache_memory="512MiB")
    conversations = chats(args.requests)
    spec = GrammarSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}}
    )
    llm.chat(conversations[:4], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    rows = []
    schema_lengths: list[int] = []
    schema = SamplingParams(max_tokens=args.max_tokens, temperature=0, structured=spec)
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    runs: list[tuple[str, SamplingParams | list[SamplingParams]]] = [
        ("json schema", schema),
        ("free text, same lengths", []),  # filled from the schema run
        ("free text, own lengths", free),
    ]
    for name, params in runs:
        if name == "free text, same lengths":
            params = [
                SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in schema_lengths
            ]
        outs, seconds = timed(lambda p=params: llm.chat(conversations, p))
        if name == "json schema":
            schema_lengths += [len(o.output_token_ids) for o in outs]
        tokens = sum(len(o.output_token_ids) for o in outs)
        valid = 0
        for o in outs:
            try:
                jsonschema.validate(json.loads(o.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        rows.append(
            {
                "run": name,
                "requests": len(outs),
                "output tokens": tokens,
                "seconds": f"{seconds:.1f}",
                "tok/s": f"{tokens / seconds:.1f}",
                "valid JSON": f"{valid}/{len(outs)}",
            }
        )
    print(machine())
    print(table(rows))
    constrained, same = (float(r["tok/s"]) for r in rows[:2])
    print(f"schema / free text of the same lengths: {constrained / same:.2f}x (target >= 0.85x)")


if __name__ == "__main__":
    main()
