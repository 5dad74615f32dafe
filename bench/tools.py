"""Forced tool calls' cost: an agent-style job on the default model, every request with the same
long tools block (about 2,000 tokens of function definitions) and ``tool_choice: "required"``,
against the same job without the grammar. The issue's targets: the constrained run within 15%
of the free run's throughput, and the shared tools block computed once.

    python bench/tools.py [--requests 256] [--tools-tokens 2000] [--max-tokens 64]

The default model's own chat template renders no tools, so the job runs with the shipped
ChatML tool template (``examples/chat_templates/chatml_tools.jinja``, Hermes-style calls as
Qwen writes them). As in ``bench/structured_output.py``, the comparison run is free text of
exactly the constrained run's output lengths (each request's ``max_tokens`` set to its
constrained output's length, EOS ignored), on the same prompts (tools rendered,
``tool_choice: "none"``): the same forward passes, so the difference is the grammar's cost.
``parallel_tool_calls`` is false (one call per answer; a 135M model asked for several repeats
its call until ``max_tokens``). Every call is checked against its function's schema.

Prefill: ``prompt tokens`` is what the requests hold, ``prefill computed`` what the engine
ran; with the tools block computed once, the difference is about (requests - 1) x the shared
prefix (system message + tools block).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
from common import machine, table, timed

from prefixbatch import LLM, SamplingParams

TEMPLATE = Path(__file__).parents[1] / "examples" / "chat_templates" / "chatml_tools.jinja"
NOUNS = ["order", "invoice", "ticket", "flight", "room", "parcel", "account", "meeting"]
VERBS = ["get", "cancel", "update", "create", "list", "check", "refund", "move"]
FIELDS = [
    ("id", {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}),
    ("reason", {"type": "string", "maxLength": 40}),
    ("priority", {"enum": ["low", "normal", "high"]}),
    ("count", {"type": "integer", "minimum": 1, "maximum": 99}),
    ("notify", {"type": "boolean"}),
]


def make_tools(tokens: int, count_tokens: Any) -> list[dict[str, Any]]:
    """Function tools (verb_noun) whose JSON holds about ``tokens`` tokens."""
    tools: list[dict[str, Any]] = []
    rng = random.Random(0)
    for verb in VERBS:
        for noun in NOUNS:
            fields = dict(rng.sample(FIELDS, 3))
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": f"{verb}_{noun}",
                        "description": f"{verb.capitalize()} the customer's {noun} by its id; "
                        f"use it when the customer asks to {verb} a {noun}.",
                        "parameters": {
                            "type": "object",
                            "properties": fields,
                            "required": sorted(fields),
                            "additionalProperties": False,
                        },
                    },
                }
            )
            if count_tokens(json.dumps(tools)) >= tokens:
                return tools
    return tools


def chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    system = "You are the support agent of a travel shop. Answer every request with a tool call."
    return [
        [
            {"role": "system", "content": system},
            {
                "role": "user",
                "content": f"Please {rng.choice(VERBS)} my {rng.choice(NOUNS)} "
                f"{rng.choice('ABCDEF')}{rng.choice('KLMN')}{rng.randrange(1000, 9999)}.",
            },
        ]
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tools-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(kv_cache_memory="1GiB")
    template = TEMPLATE.read_text()
    tools = make_tools(args.tools_tokens, lambda text: len(llm.tokenizer.encode_text(text)))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    conversations = chats(args.requests)
    options = dict(tools=tools, chat_template=template, parallel_tool_calls=False)
    llm.chat(conversations[:2], SamplingParams(max_tokens=4, temperature=0), **options)  # warm-up
    rows, lengths = [], []
    for name in ("required (grammar)", "free text, same lengths"):
        if lengths:
            params: Any = [
                SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths
            ]
            choice = "none"
        else:
            params, choice = SamplingParams(max_tokens=args.max_tokens, temperature=0), "required"
        outs, seconds = timed(
            lambda p=params, c=choice: llm.chat(conversations, p, tool_choice=c, **options)
        )
        stats = llm.engine.stats
        lengths = lengths or [len(o.output_token_ids) for o in outs]
        valid = 0
        for o in outs:
            calls = o.outputs[0].message.tool_calls if o.outputs[0].message else ()
            try:
                for call in calls:
                    jsonschema.validate(json.loads(call.arguments), schemas[call.name])
                valid += bool(calls)
            except (ValueError, KeyError, jsonschema.ValidationError):
                pass
        tokens = sum(len(o.output_token_ids) for o in outs)
        rows.append(
            {
                "run": name,
                "requests": len(outs),
                "prompt tokens": stats.prompt_tokens,
                "prefill computed": stats.prefill_tokens_computed,
                "output tokens": tokens,
                "seconds": f"{seconds:.1f}",
                "tok/s": f"{tokens / seconds:.1f}",
                "valid calls": f"{valid}/{len(outs)}",
                "cut by max_tokens": sum(o.finish_reason == "length" for o in outs),
            }
        )
    prompts = [o.prompt_token_ids for o in outs]
    shared = next(
        (i for i, ids in enumerate(zip(*prompts)) if len(set(ids)) > 1), min(map(len, prompts))
    )
    once = shared + sum(len(p) - shared for p in prompts)  # the shared prefix computed once
    print(machine())
    print(f"tools: {len(tools)} functions, {len(json.dumps(tools))} characters of JSON")
    print(table(rows))
    constrained, free = (float(r["tok/s"]) for r in rows)
    print(f"required / free text of the same lengths: {constrained / free:.2f}x (target >= 0.85x)")
    print(
        f"prefill: {rows[0]['prompt tokens']} prompt tokens, {rows[0]['prefill computed']} "
        f"computed; the {shared} tokens every prompt starts with (system message and tools) "
        f"computed once would make {once} (a level covers whole KV blocks: each request "
        "also computes the rest of the block it shares partly)"
    )


if __name__ == "__main__":
    main()
