"""A batch file mixing plain requests with logprobs, n, echo, penalties and bad feature values,
through the CLI: OpenAI's exact shapes, per-line errors, and the same answers as the Python
API."""

from __future__ import annotations

import json

from test_job import chat_line, completion_line, records, words, write_jsonl

from prefixbatch import LLM, SamplingParams
from prefixbatch.cli import main

CHAT_ENTRY = {"token", "logprob", "bytes", "top_logprobs"}


def test_a_batch_mixing_plain_and_feature_requests(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    sampled = dict(logprobs=True, top_logprobs=3, n=2, temperature=0.8, seed=5)
    lines = [
        chat_line(0),
        chat_line(1, **sampled),
        {
            **completion_line(2),
            "body": {"prompt": words(2, 12), "max_tokens": 5, "logprobs": 2, "echo": True},
        },
        chat_line(3, presence_penalty=1.0, repetition_penalty=1.3, logit_bias={"9": 3}),
        chat_line(4, response_format={"type": "json_schema", "json_schema": {"schema": []}}),
        chat_line(5, logit_bias={"600": 5}),  # outside the 512-token vocabulary
        chat_line(6, prompt_logprobs=1, max_tokens=2),
        completion_line(7),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert (
        main(["run", str(inp), "-o", str(out), "--model", model, "--quiet", "--device", "cpu"]) == 0
    )
    recs = {r["custom_id"]: r for r in records(out)}
    assert len(recs) == len(lines)
    assert "json_schema.schema" in recs["chat-4"]["error"]["message"]
    assert "logit_bias token id 600" in recs["chat-5"]["error"]["message"]

    plain = recs["chat-0"]["response"]["body"]
    assert plain["choices"][0]["logprobs"] is None and "prompt_logprobs" not in plain

    body = recs["chat-1"]["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    llm = LLM(model, device="cpu")
    conversation = lines[1]["body"]["messages"]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, n=2, logprobs=3)
    (expected,) = llm.chat([conversation], params)
    completion_tokens = 0
    for choice, want in zip(body["choices"], expected.outputs):
        content = choice["logprobs"]["content"]
        assert choice["logprobs"]["refusal"] is None
        assert choice["message"]["content"] == want.text
        assert len(content) == len(want.token_ids) and want.logprobs is not None
        completion_tokens += len(content)
        for entry, lp in zip(content, want.logprobs):
            assert set(entry) == CHAT_ENTRY and entry["logprob"] == lp.logprob
            assert bytes(entry["bytes"]).decode() == entry["token"]
            assert len(entry["top_logprobs"]) == 3
            assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
            assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
    usage = body["usage"]  # the prompt counted once, every choice's tokens
    assert usage["prompt_tokens"] == expected.num_prompt_tokens
    assert usage["completion_tokens"] == completion_tokens == expected.num_output_tokens

    echo = recs["cmpl-2"]["response"]["body"]["choices"][0]
    prompt = words(2, 12)
    assert echo["text"].startswith(prompt)
    lp = echo["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    n_prompt = len(llm.tokenizer.encode(prompt))
    n_out = recs["cmpl-2"]["response"]["body"]["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == n_prompt + n_out == len(lp["token_logprobs"])
    assert all(len(t) <= 3 for t in lp["top_logprobs"][1:])  # top 2, plus the chosen token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0

    scored = recs["chat-6"]["response"]["body"]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == expected.num_prompt_tokens
    assert all(
        v is None or set(next(iter(v.values()))) == {"logprob", "decoded_token"} for v in scored
    )

    # Resume: everything answered stays answered; the line errors are written again.
    assert (
        main(["run", str(inp), "-o", str(out), "--model", model, "--quiet", "--device", "cpu"]) == 0
    )
    again = {r["custom_id"]: r for r in records(out)}
    assert json.dumps(again["chat-1"], sort_keys=True) == json.dumps(recs["chat-1"], sort_keys=True)
