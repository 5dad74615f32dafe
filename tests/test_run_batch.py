"""``run_batch``'s hooks: stop between engine steps and resume, progress counts over the whole
file."""

from __future__ import annotations

import json
from pathlib import Path

from prefixbatch.config import EngineConfig
from prefixbatch.jobs.job import JobOptions, make_executor, run_batch


def test_stop_then_resume_counts_every_request_once(tmp_path: Path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    # Each request ends on its own step (max_tokens 2, 3, ...), so a stop after three answers
    # leaves exactly five to resume.
    lines = [
        {
            "custom_id": f"r{i}",
            "prompt": f"w{10 + i} w11 w12",
            "max_tokens": 2 + i,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(8)
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{bad\n")
    opts = JobOptions(inp, tmp_path / "out.jsonl", quiet=True)
    engine = make_executor(
        EngineConfig(model=str(tiny_models["llama"]), device="cpu", block_size=8)
    )
    seen: list[tuple[int, int, int]] = []
    first = run_batch(
        lambda: engine,
        opts,
        should_stop=lambda: len(seen) >= 4,
        on_progress=lambda *c: seen.append(c),
    )
    # one call after the error records, then one per output until the stop after the third
    assert seen == [(0, 1, 9), (1, 1, 9), (2, 1, 9), (3, 1, 9)]
    assert first.requests_ok == 3
    assert len(opts.output.read_text().splitlines()) == 4
    assert not engine.has_unfinished()  # the stop aborted the rest and freed their blocks
    assert engine.blocks.num_used == 0
    seen.clear()
    second = run_batch(lambda: engine, opts, on_progress=lambda *c: seen.append(c))
    assert second.skipped == 3 and second.requests_ok == 5
    assert seen[0] == (3, 1, 9) and seen[-1] == (8, 1, 9)
    ids = [json.loads(x)["custom_id"] for x in opts.output.read_text().splitlines()]
    assert sorted(filter(None, ids)) == sorted(f"r{i}" for i in range(8)) and ids.count(None) == 1
