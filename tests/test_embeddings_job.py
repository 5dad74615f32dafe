"""``/v1/embeddings`` lines through ``prefixbatch run``: OpenAI's response shape, base64, several
inputs per line, a mix with completion lines, per-line errors naming the field, resume."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from test_embeddings import TOLERANCE, declare_matryoshka, hf_embeddings
from test_job import completion_line, records, words, write_jsonl

from prefixbatch import LLM
from prefixbatch.cli import main

URL = "/v1/embeddings"
FULL_CONTEXT = [5 + i % 500 for i in range(128)]  # token ids, as long as --max-model-len


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("embed-job") / "qwen3", "qwen3")
    declare_matryoshka(path, [16, 64])
    return path


def line(custom_id: str, **body) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {"custom_id": custom_id, "method": "POST", "url": URL, "body": body}


def run(inp: Path, out: Path, model: Path, *extra: str) -> int:
    args = [str(inp), "-o", str(out), "--model", str(model), "--block-size", "8"]
    return main(["run", *args, "--device", "cpu", "--kv-cache-memory", "16MiB", *extra])


def vector(item: dict) -> np.ndarray:  # type: ignore[type-arg]
    value = item["embedding"]
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), "<f4")
    return np.asarray(value, np.float32)


def test_embedding_lines_end_to_end(tmp_path, model):  # type: ignore[no-untyped-def]
    instruction = words(7, 30)
    texts = [f"{instruction} {words(i, 5 + i)}" for i in range(4)]
    lines = [
        line("one", input=texts[0], model="m", user="u"),
        line("many", input=texts[1:3], encoding_format="base64"),
        completion_line(2),
        line("ids", input=[[5, 6, 7, 8], [9, 10]], dimensions=16),
        line("empty", input=[]),
        line("blank-item", input=["w5", ""]),
        line("no-mrl-size", input="w5 w6", dimensions=20),
        line("bad-format", input="w5", encoding_format="hex"),
        line("unknown", input="w5", temperature=0),
        line("too-long", input=["w5", words(1, 300)]),
        line("whole-context", input=FULL_CONTEXT),  # nothing to generate: it may fill it
        {"custom_id": "minimal", "input": texts[3]},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run(inp, out, model, "--max-model-len", "128") == 0
    recs = {r["custom_id"]: r for r in records(out)}
    assert [r["custom_id"] for r in records(out)] == [x["custom_id"] for x in lines]
    llm = LLM(str(model), device="cpu", block_size=8, kv_cache_memory=16 * 2**20)
    ids = [llm.tokenizer.encode(t) for t in texts]
    expected = hf_embeddings(model, ids, "last")
    for cid, want in (("one", [0]), ("many", [1, 2]), ("minimal", [3])):
        body = recs[cid]["response"]["body"]
        assert body["object"] == "list" and body["model"] == "qwen3"
        assert [d["index"] for d in body["data"]] == list(range(len(want)))
        assert all(d["object"] == "embedding" for d in body["data"])
        for d, k in zip(body["data"], want):
            assert np.abs(vector(d) - expected[k]).max() <= TOLERANCE
        tokens = sum(len(ids[k]) for k in want)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    whole = vector(recs["whole-context"]["response"]["body"]["data"][0])
    assert np.abs(whole - hf_embeddings(model, [FULL_CONTEXT], "last")[0]).max() <= TOLERANCE
    assert isinstance(recs["many"]["response"]["body"]["data"][0]["embedding"], str)
    assert isinstance(recs["one"]["response"]["body"]["data"][0]["embedding"], list)
    assert recs["cmpl-2"]["response"]["body"]["object"] == "text_completion"
    cut = [vector(d) for d in recs["ids"]["response"]["body"]["data"]]
    full = hf_embeddings(model, [[5, 6, 7, 8], [9, 10]], "last")
    for c, f in zip(cut, full):
        assert c.shape == (16,)
        assert np.abs(c - f[:16] / np.linalg.norm(f[:16])).max() <= TOLERANCE
    problems = {
        "empty": "'input' must be a non-empty",
        "blank-item": "'input'[1] is empty",
        "no-mrl-size": "'dimensions' must be one of 16, 64",
        "bad-format": "'encoding_format'",
        "unknown": "unknown field 'temperature'",
        "too-long": "'input'[1]: the input has 300 tokens; the model's context is 128 tokens",
    }
    for cid, text in problems.items():
        assert recs[cid]["response"] is None and text in recs[cid]["error"]["message"], cid


def test_dimensions_without_matryoshka_and_resume(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    plain = tiny_models["llama"]
    lines = [line("a", input=["w5 w6", "w7"]), line("b", input="w8", dimensions=8)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run(inp, out, plain) == 0
    first = out.read_text().splitlines()
    error = json.loads(first[1])["error"]["message"]
    assert "'dimensions' is not supported by this model" in error
    capsys.readouterr()
    lines.append(line("c", input="w9 w10"))
    assert run(write_jsonl(inp, lines), out, plain) == 0
    assert "requests: 1 ok, 1 failed, 1 already answered" in capsys.readouterr().err
    again = out.read_text().splitlines()
    assert again[0] == first[0]  # "a" was not embedded again
    assert json.loads(again[2])["response"]["body"]["data"][0]["index"] == 0
