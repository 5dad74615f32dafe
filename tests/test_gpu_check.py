"""bench/gpu_check.py's dry run: every stage's code path of the H200 run, at tiny sizes on the
CPU (the Triton kernels under the interpreter); and the driver's fail-soft staging: each stage
in a child process with a time limit, a stage that overruns recorded and the others kept."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCH))


def test_dry_run_records_every_stage(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "check.jsonl"
    rows = gpu_check.main(["--dry-run", "--in-process", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not [r for r in rows if "error" in r]
    stages = {r["name"]: r["status"] for r in rows if r["check"] == "stage"}
    assert stages == {s.name: "ok" for s in gpu_check.STAGES}
    by_check = {(r["check"], r.get("requests")): r for r in rows}

    versions = by_check["versions", None]
    assert versions["device"] == "cpu (dry run)" and versions["import"] == "ok"
    tests = by_check["kernel tests", None]
    assert tests["pytest"] == "exit 0" and tests["passed"] >= 1 and tests["failed"] == 0

    kernels = [r for r in rows if r["check"] == "kernel"]
    cases = {r["case"].split(",")[0] for r in kernels}
    assert cases == {"prefix levels", "decode below levels", "decode", "prefill", "store"}
    assert all(r["ms"] > 0 and r["gb_s"] > 0 for r in kernels)
    assert any(r.get("splits", "1/1") != "1/1" for r in kernels)  # split-KV ran

    assert by_check["parity float32", None]["exact"] == "2/2"  # fp32: token for token
    low = by_check["parity float16", None]
    assert 0 <= low["first_divergence_min"] <= low["first_divergence_mean"] <= low["tokens"]
    assert {by_check[p, None]["backend"] for p in ("parity float32", "parity float16")} == {
        "TritonBackend"
    }

    sizes = gpu_check.DRY
    assert by_check["job model", None]["backend"] == "TritonBackend"
    for n in (g * sizes.per_group for g in sizes.groups):
        for policy in ("batchllm", "fcfs-lru"):
            row = by_check[policy, n]
            assert row["output_tokens"] == n * sizes.output_len
            assert row["decode_batch"] >= 1 and row["decode_ms"] > 0
        assert by_check["batchllm", n]["groups"] == n // sizes.per_group
        assert (f"batchllm vs fcfs-lru, {n}", None) in by_check
    small = sizes.groups[0] * sizes.per_group
    hf = by_check["transformers CB", small]
    assert hf["errors"] == 0 and hf["output_tokens"] == small * sizes.output_len
    assert (f"batchllm vs transformers, {small}", None) in by_check


def test_each_stage_runs_in_a_child_with_its_time_limit(
    gpu_check: ModuleType, tmp_path: Path
) -> None:
    """A stage past its limit is stopped and recorded; the next one still runs (with the time
    the first left unused)."""
    out = tmp_path / "check.jsonl"
    argv = ["--dry-run", "--stages", "parity,versions", "--limits", "parity=1,versions=300"]
    rows = gpu_check.main([*argv, "--out", str(out)])
    stages = {r["name"]: r for r in rows if r["check"] == "stage"}
    assert stages["versions"]["status"] == "ok"
    assert stages["parity"]["status"] == "timed out after 1 s"
    assert [r["check"] for r in rows if r.get("stage") == "versions"] == ["versions"]
    assert not [r for r in rows if r.get("stage") == "parity"]


def test_kernel_test_outcomes_are_read_from_pytest_output(gpu_check: ModuleType) -> None:
    output = """
tests/test_a.py::test_x[cpu] PASSED                                      [ 10%]
[gw1] [ 20%] FAILED tests/test_a.py::test_y[cuda]
[gw0] [ 30%] SKIPPED tests/test_a.py::test_z[cpu]
tests/test_b.py::test_w ERROR
=========================== short test summary info ============================
FAILED tests/test_a.py::test_y[cuda] - AssertionError: bf16: 3.1e-02
"""
    assert gpu_check.pytest_outcomes(output) == {
        "PASSED": {"tests/test_a.py::test_x[cpu]"},
        "FAILED": {"tests/test_a.py::test_y[cuda]"},
        "SKIPPED": {"tests/test_a.py::test_z[cpu]"},
        "ERROR": {"tests/test_b.py::test_w"},
    }
