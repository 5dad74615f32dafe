"""What the GPU check's stages share: the sizes of the H200 run and of the CPU dry run, the
job's prompts and FLOP count, and the JSON-lines recorder every stage appends its rows with.

Imports only the standard library: the check's driver reads it without loading torch."""

from __future__ import annotations

import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEAK_FLOPS = 800e12  # H200 bf16 dense matmul, measured (docs GPU.md)


@dataclass(frozen=True)
class KernelShapes:
    """The attention kernels' microbenchmark shapes (the job model's heads, the job's lengths)."""

    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    prefix_len: int  # keys of each prefix level (whole blocks)
    rows_per_level: int
    levels: tuple[int, ...]  # prefix levels of a decode step (x rows_per_level rows)
    own_len: int  # own keys of a decode row below a level (suffix + output so far)
    prefill: tuple[int, int]  # (sequences, new tokens each) of a prefill step
    store_tokens: int  # new K/V rows of a step


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the H200 run and the CPU dry run."""

    device: str
    dtype: str  # the job's dtype, and the parity check's low-precision one
    parity_config: dict[str, Any]
    job_config: dict[str, Any]
    parity_prompts: int
    parity_tokens: int
    groups: tuple[int, ...]  # prefix groups per job size (x per_group requests)
    per_group: int
    prefix_len: int
    suffix_len: int
    output_len: int
    warmup: tuple[int, int]  # (groups, output tokens) of the warm-up job
    kv_cache_memory: int
    max_num_batched_tokens: int
    hf_cache_blocks: int | None  # transformers CB's paged cache (None: it sizes its own)
    kernel_tests: tuple[str, ...]  # pytest arguments of the kernel-test stage
    kernels: KernelShapes


LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
SMALL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
# 4 heads of 16 (the smallest head the Triton kernels take) over 2 KV heads.
TINY = dict(
    SMALL,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=512,
)

TESTS = ("tests/test_triton_attention.py", "tests/test_triton_specialisation.py")
GPU = Sizes(
    device="cuda",
    dtype="bfloat16",
    parity_config=SMALL,
    job_config=LLAMA3_8B,
    parity_prompts=16,
    parity_tokens=24,
    groups=(8, 64),
    per_group=16,
    prefix_len=2000,
    suffix_len=200,
    output_len=100,
    warmup=(2, 4),
    kv_cache_memory=48 * 2**30,
    max_num_batched_tokens=8192,
    hf_cache_blocks=None,
    kernel_tests=(*TESTS, "tests/test_cuda_graphs.py", "-k", "not sm90"),
    kernels=KernelShapes(32, 8, 128, 16, 2000, 16, (8, 64), 250, (4, 2048), 8192),
)
# The dry run: every stage's code at tiny sizes on the CPU, the kernels under Triton's
# interpreter (fp32 and fp16 only: its bf16 dot products are wrong).
DRY = Sizes(
    device="cpu",
    dtype="float16",
    parity_config=TINY,
    job_config=TINY,
    parity_prompts=2,
    parity_tokens=3,
    groups=(1, 2),
    per_group=2,
    prefix_len=32,
    suffix_len=4,
    output_len=2,
    warmup=(1, 1),
    kv_cache_memory=4 * 2**20,
    max_num_batched_tokens=64,
    hf_cache_blocks=64,
    kernel_tests=(TESTS[0], "-k", "split_counts"),
    kernels=KernelShapes(4, 2, 16, 16, 32, 2, (2,), 16, (1, 16), 16),
)


def job_prompts(sizes: Sizes, groups: int, vocab: int) -> list[list[int]]:
    """groups x per_group token-id prompts: a shared prefix + an own suffix each, shuffled
    (seed 0): the job of docs GPU.md."""
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    prompts = [
        prefix + tokens(sizes.suffix_len)
        for prefix in (tokens(sizes.prefix_len) for _ in range(groups))
        for _ in range(sizes.per_group)
    ]
    rng.shuffle(prompts)
    return prompts


def useful_flops(params: int, sizes: Sizes, groups: int) -> float:
    """2 x non-embedding parameters x (unique prefill tokens + output tokens) of the job of
    ``groups`` groups (the issue's MFU definition)."""
    requests = groups * sizes.per_group
    unique = groups * sizes.prefix_len + requests * sizes.suffix_len
    return 2.0 * params * (unique + requests * sizes.output_len)


class Recorder:
    """Appends each row to the JSON-lines file as soon as it exists (a later crash or time
    limit keeps it); ``attempt`` records a failed check as a row and goes on. ``deadline``
    (``time.time()``; None: none) is when the stage's process will be stopped."""

    def __init__(self, out: Path, stage: str = "", deadline: float | None = None) -> None:
        self.out = out
        self.stage = stage
        self.deadline = deadline
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def record(self, row: dict[str, Any]) -> None:
        row = {"stage": self.stage, **row} if self.stage else row
        self.rows.append(row)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row}", flush=True)

    def attempt(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
        """Run one check, record its row (if it returns one) or its failure."""
        print(f"{name} ... ({time.perf_counter() - self.start:.0f} s)", flush=True)
        try:
            row = fn()
        except Exception as e:  # a failed check must not lose the others
            self.record({"check": name, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
            return False
        if row is not None:
            self.record(row)
        return True
