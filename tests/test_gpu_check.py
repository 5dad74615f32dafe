"""bench/gpu_check.py's dry run: the same code paths as the H200 run, at tiny sizes on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_dry_run_records_every_check(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "check.jsonl"
    rows = gpu_check.main(["--dry-run", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not [r for r in rows if "error" in r]
    by_check = {(r["check"], r.get("requests")): r for r in rows}
    assert by_check["environment", None]["device"] == "cpu (dry run)"
    assert by_check["parity float32", None]["exact"] == "4/4"  # fp32: token for token
    bf16 = by_check["parity bfloat16", None]
    assert 0 <= bf16["first_divergence_min"] <= bf16["first_divergence_mean"] <= bf16["tokens"]
    sizes = gpu_check.DRY
    for n in (g * sizes.per_group for g in sizes.groups):
        for policy in ("batchllm", "fcfs-lru"):
            row = by_check[policy, n]
            assert row["output_tokens"] == n * sizes.output_len
            assert row["decode_batch"] > 1 and row["decode_ms"] > 0
        assert by_check["batchllm", n]["groups"] == n // sizes.per_group
        assert ("batchllm vs fcfs-lru, " + str(n), None) in by_check
    small = sizes.groups[0] * sizes.per_group
    hf = by_check["transformers CB", small]
    assert hf["errors"] == 0 and hf["output_tokens"] == small * sizes.output_len
    assert (f"batchllm vs transformers, {small}", None) in by_check
