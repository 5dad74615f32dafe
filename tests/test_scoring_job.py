"""``/v1/score`` and ``/v1/rerank`` lines through ``prefixbatch run`` (vLLM's response shapes,
1-to-N and N-to-N pairs, rerank order and ``top_n``, a mix with other endpoints, per-line errors
naming the field, resume), through ``prefixbatch serve`` with a reranker's score tokens, and on
Ray workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_job import completion_line, records, words, write_jsonl
from test_scoring import (
    DOCS,
    FALSE,
    QUERY,
    TOLERANCE,
    TRUE,
    hf_classifier_scores,
    hf_token_scores,
    make_classifier,
    pair_ids,
)

from prefixbatch.cli import main


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("score-job") / "qwen3", "qwen3")


def line(custom_id: str, url: str = "/v1/score", **body) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def run(inp: Path, out: Path, model: Path, *extra: str) -> int:
    args = [str(inp), "-o", str(out), "--model", str(model), "--block-size", "8"]
    return main(["run", *args, "--device", "cpu", "--kv-cache-memory", "16MiB", *extra])


def test_score_and_rerank_lines_end_to_end(tmp_path, classifier, capsys):  # type: ignore[no-untyped-def]
    lines = [
        line("one-to-n", queries=QUERY, documents=DOCS[:4], model="m", user="u"),
        line("n-to-n", text_1=[QUERY, DOCS[0]], text_2=[DOCS[5], DOCS[6]]),
        completion_line(1),
        line("rerank", "/v1/rerank", query=QUERY, documents=DOCS[:5], top_n=3),
        line("rerank-bare", "/v1/rerank", query=QUERY, documents=DOCS[:2], return_documents=False),
        line("raw", data_1=QUERY, data_2=DOCS[7], use_activation=False),
        {"custom_id": "minimal", "queries": QUERY, "items": [DOCS[8]]},
        line("empty", text_1="w5", text_2=[]),
        line("mismatched", queries=["w5", "w6"], documents=["w7", "w8", "w9"]),
        line("too-long", queries="w5", documents=["w6", words(1, 300)]),
        line("unknown", queries="w5", documents="w6", temperature=0),
        line("no-pairs", "/v1/rerank", query="w5"),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run(inp, out, classifier, "--max-model-len", "128") == 0
    # 18 requests (pairs and the completion); the completion and both pairs of "too-long" (a
    # line fails as a whole: its fitting pair is not computed) are rejected
    assert "18 requests read, 3 rejected by the checks against the model, 15 to run" in (
        capsys.readouterr().err
    )
    recs = {r["custom_id"]: r for r in records(out)}
    assert [r["custom_id"] for r in records(out)] == [x["custom_id"] for x in lines]
    pairs = [(QUERY, d) for d in DOCS]
    ids = pair_ids(classifier, pairs) + pair_ids(classifier, [(DOCS[0], DOCS[6])])
    expected = hf_classifier_scores(classifier, ids)  # by document, then DOCS[0] + DOCS[6]

    body = recs["one-to-n"]["response"]["body"]
    assert body["object"] == "list" and body["model"] == "qwen3" and body["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(4)]
    assert max(abs(d["score"] - expected[i]) for i, d in enumerate(body["data"])) <= TOLERANCE
    tokens = sum(len(ids[i]) for i in range(4))
    assert body["usage"] == {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
    }
    n_to_n = [d["score"] for d in recs["n-to-n"]["response"]["body"]["data"]]
    assert abs(n_to_n[0] - expected[5]) <= TOLERANCE and abs(n_to_n[1] - expected[-1]) <= TOLERANCE
    minimal = recs["minimal"]["response"]["body"]["data"]
    assert abs(minimal[0]["score"] - expected[8]) <= TOLERANCE
    raw = recs["raw"]["response"]["body"]["data"][0]["score"]
    assert abs(1 / (1 + pow(2.718281828459045, -raw)) - expected[7]) <= 1e-4

    rerank = recs["rerank"]["response"]["body"]
    best = sorted(range(5), key=lambda i: expected[i], reverse=True)[:3]
    assert [r["index"] for r in rerank["results"]] == best
    for r in rerank["results"]:
        assert r["document"] == {"text": DOCS[r["index"]]}
        assert abs(r["relevance_score"] - expected[r["index"]]) <= TOLERANCE
    tokens = sum(len(ids[i]) for i in range(5))
    assert rerank["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    bare = recs["rerank-bare"]["response"]["body"]["results"]
    assert len(bare) == 2 and all(set(r) == {"index", "relevance_score"} for r in bare)
    problems = {
        # a classifier has no trained lm_head: text is refused (vLLM: a pooling model only)
        "cmpl-1": "this model is a sequence classifier (a score head and no lm_head)",
        "empty": "'text_2' must be a string or a non-empty list",
        "mismatched": "'queries' has 2 items and 'documents' 3: the pairs are 1-to-1",
        "too-long": "'documents'[1]: the input has 301 tokens; the model's context is 128 tokens",
        "unknown": "unknown field 'temperature' for /v1/score",
        "no-pairs": "missing 'documents'",
    }
    for cid, text in problems.items():
        assert recs[cid]["response"] is None and text in recs[cid]["error"]["message"], cid


def test_a_model_without_score_head_and_resume(tmp_path, tiny_models, classifier, capsys):  # type: ignore[no-untyped-def]
    lines = [line("a", text_1="w5", text_2=["w6", "w7"])]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run(inp, out, tiny_models["llama"]) == 0
    error = records(out)[0]["error"]["message"]
    assert "this model cannot score: it has no score head" in error and "--score-tokens" in error
    assert run(inp, out, classifier) == 0  # the error record never makes a line skip
    first = out.read_text()
    assert records(out)[0]["response"]["body"]["data"][1]["index"] == 1
    capsys.readouterr()
    lines.append(line("b", "/v1/rerank", query="w5", documents=["w8", "w9"]))
    assert run(write_jsonl(inp, lines), out, classifier) == 0
    assert "requests: 1 ok, 0 failed, 1 already answered" in capsys.readouterr().err
    assert out.read_text().splitlines()[0] == first.splitlines()[0]  # "a" was not run again


def test_reranker_batch_through_the_server(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    from test_server import Server, answers_of

    model = tiny_models["qwen3"]
    root = tmp_path / "server"
    root.mkdir()
    server = Server(
        model, root / "data", root / "server.log", ("--score-tokens", f"{FALSE},{TRUE}")
    )
    try:
        lines = [
            line("r", "/v1/rerank", query=QUERY, documents=DOCS[:3]),
            line("bad", "/v1/rerank", query=QUERY, documents=[]),
        ]
        file_id = server.upload(write_jsonl(tmp_path / "in.jsonl", lines))
        batch = server.wait(server.create(file_id, endpoint="/v1/rerank"))
        assert batch.status == "completed" and batch.request_counts.failed == 1
        results = answers_of(server.content(batch.output_file_id))["r"]["results"]
        expected = hf_token_scores(model, pair_ids(model, [(QUERY, d) for d in DOCS[:3]]), 10, 11)
        assert [r["index"] for r in results] == sorted(range(3), key=lambda i: -expected[i])
        assert all(abs(r["relevance_score"] - expected[r["index"]]) <= TOLERANCE for r in results)
        error = json.loads(server.content(batch.error_file_id))
        assert "'documents' must be a string or a non-empty list" in error["error"]["message"]
    finally:
        server.kill()
