"""``prefixbatch serve`` end to end: a real server process on 127.0.0.1 driven by the official
``openai`` client, answers compared with ``prefixbatch run`` on the same file (greedy)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from test_job import chat_line, completion_line, write_jsonl  # the batch lines of the CLI tests

import prefixbatch
from prefixbatch.cli import main

KEY = "sk-test-key"
# a small KV pool (10 blocks): few requests run at once, so a long batch takes many steps
ENGINE = ["--block-size", "8", "--max-num-batched-tokens", "64", "--kv-cache-memory", "64KiB"]
ENGINE += ["--device", "cpu"]  # the CPU path on any machine
TERMINAL = ("completed", "failed", "cancelled", "expired")


def long_line(i: int) -> dict[str, Any]:
    """A request that runs many steps (EOS ignored), so a batch of them can be interrupted."""
    line = completion_line(i, max_tokens=48)
    line["body"]["ignore_eos"] = True
    return line


def http_get(url: str, key: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a plain GET, with or without the bearer key."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answers(text: str) -> dict[str, str]:
    """custom_id -> answer text of each success record (chat or completion)."""
    out = {}
    for line in text.splitlines():
        rec = json.loads(line)
        assert rec["custom_id"] not in out, f"{rec['custom_id']} answered twice"
        choice = rec["response"]["body"]["choices"][0]
        out[rec["custom_id"]] = (
            choice["message"]["content"] if "message" in choice else choice["text"]
        )
    return out


def cli_answers(model: Path, inp: Path, out: Path) -> dict[str, str]:
    assert main(["run", str(inp), "-o", str(out), "--model", str(model), "--quiet", *ENGINE]) == 0
    lines = [x for x in out.read_text().splitlines() if json.loads(x)["response"]]
    return answers("\n".join(lines))


class Server:
    """A ``prefixbatch serve`` subprocess on a free port of 127.0.0.1."""

    def __init__(self, model: Path, data_dir: Path, log: Path, extra: tuple[str, ...] = ()) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        src = str(Path(prefixbatch.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "prefixbatch.cli", "serve", "--model", str(model)]
        cmd += ["--port", str(self.port), "--data-dir", str(data_dir), "--api-key", KEY, *ENGINE]
        cmd += extra
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if http_get(f"{self.url}/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        else:
            self.kill()
            raise RuntimeError("the server did not come up in 120 s")
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=30
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            return self.client.files.create(file=f, purpose="batch").id

    def create(self, file_id: str, endpoint: str = "/v1/chat/completions") -> str:
        return self.client.batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window="24h"
        ).id

    def wait(self, batch_id: str, until: Any = lambda b: b.status in TERMINAL) -> Any:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            batch = self.client.batches.retrieve(batch_id)
            if until(batch):
                return batch
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} still {batch.status} after 90 s")

    def content(self, file_id: str | None) -> str:
        return self.client.files.content(file_id).text if file_id else ""


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    srv = Server(model, root / "data", root / "server.log")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def long_batch(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    """A long completions batch and its uninterrupted answers from ``prefixbatch run``."""
    root = tmp_path_factory.mktemp("long")
    inp = write_jsonl(root / "long.jsonl", [long_line(i) for i in range(24)])
    return inp, cli_answers(model, inp, root / "reference.jsonl")


def test_batch_answers_equal_the_cli_and_errors_go_to_the_error_file(
    server: Server, model: Path, tmp_path: Path
) -> None:
    lines = [chat_line(i) for i in range(6)]
    lines.insert(3, {"custom_id": "no-messages", "url": "/v1/chat/completions", "body": {}})
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    expected = cli_answers(model, inp, tmp_path / "cli.jsonl")
    file = server.client.files.retrieve(server.upload(inp))
    assert (file.object, file.purpose, file.bytes, file.filename) == (
        "file",
        "batch",
        inp.stat().st_size,
        "in.jsonl",
    )
    assert server.content(file.id) == inp.read_text()
    created = server.client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "e2e"},
    )
    assert created.status == "validating" and created.metadata == {"job": "e2e"}
    batch = server.wait(created.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 6, 1)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert len(expected) == 6 and answers(server.content(batch.output_file_id)) == expected
    [error] = [json.loads(x) for x in server.content(batch.error_file_id).splitlines()]
    assert error["custom_id"] == "no-messages" and error["response"] is None
    assert error["error"]["line"] == 4 and "messages" in error["error"]["message"]
    output = server.client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output"
    models = server.client.models.list().data
    assert [m.id for m in models] == [model.name]


def test_embeddings_batch(server: Server, model: Path, tmp_path: Path) -> None:
    from test_embeddings import TOLERANCE, hf_embeddings
    from test_embeddings_job import line, vector

    lines = [
        line("a", input=["w5 w6 w7", "w5 w6 w8"]),
        line("b", input=[5, 9], encoding_format="base64"),
    ]
    lines.append(line("c", input=[]))
    file_id = server.upload(write_jsonl(tmp_path / "in.jsonl", lines))
    batch = server.wait(server.create(file_id, endpoint="/v1/embeddings"))
    assert batch.status == "completed" and batch.request_counts.failed == 1
    got = answers_of(server.content(batch.output_file_id))
    expected = hf_embeddings(model, [[5, 6, 7], [5, 6, 8], [5, 9]], "last")  # w5 -> id 5
    vectors = [vector(d) for cid in "ab" for d in got[cid]["data"]]
    assert len(vectors) == 3
    assert all(np.abs(g - e).max() <= TOLERANCE for g, e in zip(vectors, expected))
    assert "'input'" in server.content(batch.error_file_id)
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        server.create(file_id, endpoint="/v1/moderations")


def answers_of(text: str) -> dict[str, Any]:
    """Each success record's response body, by custom_id."""
    records = [json.loads(x) for x in text.splitlines()]
    return {r["custom_id"]: r["response"]["body"] for r in records if r["response"]}


def test_two_batches_back_to_back_and_pagination(server: Server, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    file_id = server.upload(inp)
    first, second = server.create(file_id), server.create(file_id)
    done = [server.wait(first), server.wait(second)]
    assert [b.status for b in done] == ["completed", "completed"]
    assert answers(server.content(done[0].output_file_id)) == answers(
        server.content(done[1].output_file_id)
    )
    assert done[0].completed_at <= done[1].in_progress_at  # one at a time, in order
    page = server.client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second] and page.has_more  # newest first
    page = server.client.batches.list(limit=1, after=second)
    assert [b.id for b in page.data] == [first]
    ids = [b.id for b in server.client.batches.list(limit=2)]  # auto-pagination
    assert ids.index(second) == ids.index(first) - 1 and len(ids) == len(set(ids))
    status, raw = http_get(f"{server.url}/v1/batches?limit=1", KEY)
    assert status == 200 and raw["object"] == "list" and raw["first_id"] == raw["last_id"] == second
    files = server.client.files.list(limit=1, purpose="batch")
    assert [f.id for f in files.data] == [file_id]


def test_cancel_mid_batch_keeps_what_finished(
    server: Server,
    long_batch: tuple[Path, dict],  # type: ignore[type-arg]
) -> None:
    inp, expected = long_batch
    batch_id = server.create(server.upload(inp), "/v1/completions")
    server.wait(batch_id, lambda b: b.request_counts and b.request_counts.completed >= 1)
    cancelling = server.client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = server.wait(batch_id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    got = answers(server.content(batch.output_file_id))
    assert 1 <= len(got) == batch.request_counts.completed < len(expected) == 24
    assert got == {k: expected[k] for k in got}
    with pytest.raises(openai.ConflictError):
        server.client.batches.cancel(batch_id)


def test_bad_requests_get_openai_errors(server: Server, tmp_path: Path) -> None:
    assert http_get(f"{server.url}/health") == (200, {"status": "ok"})  # no key needed
    status, body = http_get(f"{server.url}/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.batches.list()
    for bad_id in ("file-abc", "../../etc/passwd", "batch_" + "0" * 24):
        with pytest.raises(openai.NotFoundError) as e:
            server.client.files.retrieve(bad_id)
        assert e.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        server.client.batches.retrieve("file-" + "0" * 24)
    with pytest.raises(openai.NotFoundError) as e:
        server.create("file-" + "0" * 24)
    assert e.value.param == "input_file_id"  # type: ignore[attr-defined]
    before = server.client.files.list().data
    not_jsonl = write_jsonl(tmp_path / "bad.jsonl", [chat_line(0), "[1, 2]", "not json"])
    with pytest.raises(openai.BadRequestError) as e:
        server.upload(not_jsonl)
    assert "line 2" in e.value.message
    with open(write_jsonl(tmp_path / "ok.jsonl", [chat_line(0)]), "rb") as f:
        with pytest.raises(openai.BadRequestError) as e:
            server.client.files.create(file=f, purpose="fine-tune")
    assert e.value.param == "purpose"  # type: ignore[attr-defined]
    assert server.client.files.list().data == before  # nothing stored
    file_id = server.upload(tmp_path / "ok.jsonl")
    with pytest.raises(openai.BadRequestError):
        server.client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/moderations",
            completion_window="24h",
        )
    with pytest.raises(openai.BadRequestError):
        server.client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    mismatched = server.wait(server.create(file_id, "/v1/completions"))
    assert mismatched.status == "failed" and mismatched.errors.data[0].line == 1
    deleted = server.client.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        server.client.files.content(file_id)


def test_sigkill_mid_batch_then_restart_resumes(
    model: Path,
    long_batch: tuple[Path, dict],
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    inp, expected = long_batch
    data, log = tmp_path / "data", tmp_path / "server.log"
    srv = Server(model, data, log)
    try:
        batch_id = srv.create(srv.upload(inp), "/v1/completions")
        seen = srv.wait(batch_id, lambda b: b.request_counts and b.request_counts.completed >= 3)
    finally:
        srv.kill()
    assert seen.status == "in_progress", "the kill must land mid-batch"
    srv = Server(model, data, log)
    try:
        batch = srv.wait(batch_id)
        assert batch.status == "completed" and batch.error_file_id is None
        assert batch.request_counts.completed == batch.request_counts.total == 24
        assert answers(srv.content(batch.output_file_id)) == expected  # each custom_id once
    finally:
        srv.kill()
    said = log.read_text()  # both runs: what the server is doing, in its log
    assert said.count("loading the model") == 2 and said.count("model loaded after") == 2
    assert f"serving the OpenAI Files and Batches API at http://127.0.0.1:{srv.port}/v1" in said
    assert f"batch {batch_id} completed: 24 of 24 lines answered, 0 failed" in said
