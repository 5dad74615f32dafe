"""Resume and job-level behaviour through the CLI: a request is skipped only for a success record
of the same custom_id and request, the finished output holds one record per input line, Ctrl-C
and SIGTERM stop cleanly, and bad lines (token ids outside the vocabulary) never stop the job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_job import completion_line, records, write_jsonl

from prefixbatch.cli import main


def run(inp: Path, out: Path, model: str, *extra: str) -> int:
    return main(
        [
            "run",
            str(inp),
            "-o",
            str(out),
            "--model",
            model,
            "--block-size",
            "8",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_resume_after_editing_the_input(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    out = tmp_path / "out.jsonl"
    first = [completion_line(0), "{broken", completion_line(2), completion_line(3)]
    first.append({"custom_id": 17, "prompt": "w3 w4"})
    assert run(write_jsonl(tmp_path / "in.jsonl", first), out, model) == 0
    before = out.read_text().splitlines()
    assert [json.loads(r)["custom_id"] for r in before] == ["cmpl-0", None, "cmpl-2", "cmpl-3", 17]
    capsys.readouterr()
    # The user fixes the broken line (a new custom_id), shortens cmpl-2, deletes cmpl-3 and
    # gives line 5 a string id; the output is the same file.
    edited = [completion_line(0), completion_line(1), completion_line(2, max_tokens=3)]
    edited.append({"custom_id": "seventeen", "prompt": "w3 w4"})
    assert run(write_jsonl(tmp_path / "in.jsonl", edited), out, model) == 0
    err = capsys.readouterr().err
    assert "requests: 3 ok, 0 failed, 1 already answered" in err
    after = out.read_text().splitlines()
    recs = [json.loads(line) for line in after]
    assert [r["custom_id"] for r in recs] == ["cmpl-0", "cmpl-1", "cmpl-2", "seventeen"]
    assert all(r["error"] is None for r in recs)
    assert after[0] == before[0]  # reused as it was
    assert recs[2]["response"]["body"]["usage"]["completion_tokens"] <= 3  # re-run: body changed
    assert recs[2]["request_hash"] != json.loads(before[2])["request_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp


def test_error_records_never_make_a_request_skip(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    # What an early interrupt leaves when line 2 was malformed: its error record only.
    out = tmp_path / "out.jsonl"
    error = {"id": "batch_req_x", "custom_id": None, "response": None}
    error["error"] = {"code": "invalid_request", "message": "line 2: invalid JSON", "line": 2}
    write_jsonl(out, [error])
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(i) for i in range(3)])
    assert run(inp, out, str(tiny_models["llama"]), "--quiet") == 0
    recs = records(out)
    assert [r["custom_id"] for r in recs] == ["cmpl-0", "cmpl-1", "cmpl-2"]
    assert all(r["error"] is None for r in recs)


def test_all_answered_runs_without_loading_the_model(tmp_path, tiny_models, capsys):  # type: ignore[no-untyped-def]
    inp = write_jsonl(tmp_path / "in.jsonl", [completion_line(0), completion_line(1), "[1]"])
    out = tmp_path / "out.jsonl"
    assert run(inp, out, str(tiny_models["llama"]), "--quiet") == 0
    # A model path that does not exist: loading it would fail with exit code 2.
    assert run(inp, out, str(tmp_path / "no-model")) == 0
    err = capsys.readouterr().err
    assert "requests: 0 ok, 1 failed, 2 already answered" in err
    assert "loading the model" not in err
    assert len(records(out)) == 3


@pytest.mark.parametrize(
    ("lines", "code", "message"),
    [
        (None, 2, "the output file must not be the input file"),
        (["", "  "], 2, "is empty: it has no request lines"),
        (["{bad", "[1]"], 0, "no line of the input is a valid request"),
    ],
)
def test_job_messages(tmp_path, tiny_models, capsys, lines, code, message):  # type: ignore[no-untyped-def]
    inp = write_jsonl(tmp_path / "in.jsonl", lines or [completion_line(0)])
    out = inp if lines is None else tmp_path / "out.jsonl"
    original = inp.read_text()
    assert run(inp, out, str(tiny_models["llama"])) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "loading the model" not in err
    assert inp.read_text() == original
    if code == 2 and lines is not None:
        assert not out.exists()  # a job that stops before any record leaves no empty output
    if code == 0:
        assert [r["error"]["line"] for r in records(out)] == [1, 2]


def test_out_of_vocabulary_ids_are_line_errors(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    lines = [
        completion_line(0),
        {"custom_id": "oov-vocab-size", "prompt": [5, 6, 512]},  # the tiny vocabulary is 512
        {"custom_id": "oov-huge", "prompt": [5, 999999999]},
        {"custom_id": "ok-ids", "prompt": [5, 6, 511], "max_tokens": 3},
    ]
    out = tmp_path / "out.jsonl"
    assert run(write_jsonl(tmp_path / "in.jsonl", lines), out, str(tiny_models["llama"])) == 0
    recs = {r["custom_id"]: r for r in records(out)}
    assert recs["cmpl-0"]["error"] is None and recs["ok-ids"]["error"] is None
    for cid, bad in (("oov-vocab-size", 512), ("oov-huge", 999999999)):
        assert recs[cid]["error"]["message"].endswith(
            f"token id {bad} is outside the model's vocabulary (ids 0 to 511)"
        )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_flushes_and_exits_130(tmp_path, tiny_models, sig):  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    lines = [completion_line(i, max_tokens=60) for i in range(40)] + ["{bad line"]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "prefixbatch.cli", "run", str(inp), "-o", str(out)]
    cmd += ["--model", model, "--quiet", "--block-size", "8", "--max-num-batched-tokens", "64"]
    cmd += ["--device", "cpu"]
    cmd += ["--kv-cache-memory", "200KiB"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_bytes().splitlines()) >= 4:  # the error and 3 answers
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    answered = sum(r["error"] is None for r in records(out))
    assert 3 <= answered < 40, "the signal must land mid-run"
    assert err.strip().splitlines() == [
        f"prefixbatch: interrupted: {answered} of 40 runnable requests answered, 1 line failed; "
        "run the same command again to resume"
    ]
    assert run(inp, out, model, "--quiet") == 0
    ids = [r["custom_id"] or r["error"]["line"] for r in records(out)]
    assert len(ids) == len(set(ids)) == 41


def test_progress_clock_is_the_jobs_clock():  # type: ignore[no-untyped-def]
    import io

    from prefixbatch.io.progress import Progress

    stream = io.StringIO()
    progress = Progress(2, stream=stream, interval=0.0, start=time.monotonic() - 30)
    progress.update(2, 10)
    assert "elapsed 30s, eta 0s" in stream.getvalue()
