"""No Triton recompilation inside a job: every launch of a job's steps (prefill chunks, decode
rows, nested levels, CUDA-graph buckets, split-KV) maps to the compiled variant its kernel
already has, as Triton's own launcher keys its cache for an H100/H200 (sm_90).

Triton compiles one variant per specialisation key: constexpr values, argument types, integers
equal to 1 or divisible by 16, and pointers aligned to 16 bytes. The kernels here are recorded
instead of launched, so the test is fast and needs no GPU; the keys are computed by Triton's
launcher code (``create_function_from_signature``) from the recorded arguments.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from prefixbatch.execution.attention import triton_kernels as tk  # noqa: E402
from prefixbatch.execution.attention.step import AttentionStep, PrefixLevel  # noqa: E402
from prefixbatch.execution.attention.triton_backend import TritonBackend  # noqa: E402
from prefixbatch.execution.kv_cache import KVCache  # noqa: E402

KERNELS = ("prefix_level_kernel", "own_kv_kernel", "merge_splits_kernel", "store_kv_kernel")
ORIGINALS = {name: getattr(tk, name) for name in KERNELS}  # before any test patches them
# Compiled variants a job needs: the own-KV kernel has one with its KV split and one without.
EXPECTED = {"prefix_level_kernel": 1, "own_kv_kernel": 2, "merge_splits_kernel": 1}
Launch = tuple[tuple[Any, ...], dict[str, Any]]


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the arguments."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def settings(kernel: Any) -> dict[str, list[str]]:
    """The kernel's ``do_not_specialize*`` lists (a JITFunction, or the interpreter's)."""
    given = getattr(kernel, "kwargs", None) or vars(kernel)
    keys = ("do_not_specialize", "do_not_specialize_on_alignment")
    return {k: list(given.get(k) or []) for k in keys}


def variants(kernel: Any, launches: list[Launch], with_settings: bool = True) -> set[str]:
    """The compile-cache keys Triton's launcher computes for ``launches`` on sm_90."""
    jit = JITFunction(kernel.fn, **(settings(kernel) if with_settings else {}))
    binder = create_function_from_signature(
        jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    return {str(binder(*args, **kwargs)[1]) for args, kwargs in launches}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    recorders = {name: Recorder() for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(tk, name, recorder)
    return recorders


def test_per_step_arguments_are_not_specialised() -> None:
    """The settings themselves: the table widths, split strides and counts, and the metadata
    pointers (views at any offset of one buffer)."""
    own = settings(tk.own_kv_kernel)
    assert {"stride_table", "stride_seq_levels", "stride_ps", "stride_ls", "prefix_splits"} <= set(
        own["do_not_specialize"]
    )
    assert {"block_table_ptr", "seq_levels_ptr", "tile_seq_ptr"} <= set(
        own["do_not_specialize_on_alignment"]
    )
    prefix = settings(tk.prefix_level_kernel)
    assert {"stride_lvl_blocks", "stride_ps"} <= set(prefix["do_not_specialize"])
    assert "lvl_blocks_ptr" in prefix["do_not_specialize_on_alignment"]
    assert "num_splits" in settings(tk.merge_splits_kernel)["do_not_specialize"]
    assert settings(tk.store_kv_kernel)["do_not_specialize_on_alignment"] == ["slot_ptr"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU job (the GPU check counts compiles)")
def test_a_job_compiles_each_kernel_once(recorded: dict[str, Recorder], tiny_models) -> None:  # type: ignore[no-untyped-def]
    """A whole engine job in fp16 (the module forward a GPU runs) with nested prefix levels,
    prefill chunks crossing blocks, decode steps through the CUDA-graph buffers and eagerly,
    and split-KV in small steps: one variant per kernel (two for the own-KV kernel: with and
    without its split). Without the settings the same launches need several."""
    from conftest import nested_prompts
    from prefixbatch import LLM, SamplingParams

    llm = LLM(
        str(tiny_models["llama"]),
        device="cpu",
        dtype="float16",
        block_size=8,
        kv_cache_memory=4 * 2**20,
        attention_backend="triton",
        cascade_min_prefix=0,
        max_num_batched_tokens=24,
        max_cuda_graph_batch=4,
    )
    llm.engine.backend.target_programs = 16  # type: ignore[attr-defined]
    rng = random.Random(5)
    prompts = nested_prompts(rng, system=16, doc=24, docs=3, per_doc=3, vocab=(3, 500))
    prompts += [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 11, 40)]
    llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert llm.engine.stats.groups >= 4

    for name in KERNELS:
        launches = recorded[name].launches
        assert len(launches) > 20, name
        assert len(variants(ORIGINALS[name], launches)) == EXPECTED.get(name, 1), name
    for name in ("prefix_level_kernel", "own_kv_kernel"):
        unset = variants(ORIGINALS[name], recorded[name].launches, with_settings=False)
        assert len(unset) > EXPECTED[name], name


def decode_rows(rng: random.Random, depth: int) -> AttentionStep:
    """2-5 decode rows below a chain of ``depth`` levels (1-3 blocks each; no level when 0),
    and two rows read whole."""
    from test_triton_attention import StepMaker

    maker = StepMaker(rng, 16, 400)
    chain = [maker.blocks(rng.randrange(1, 4)) for _ in range(depth)]
    below = rng.randrange(2, 6)
    for _ in range(below):
        maker.seq([b for blocks in chain for b in blocks], q_len=1)
    for _ in range(2):
        maker.seq([], q_len=1)
    starts = [16 * sum(map(len, chain[:d])) for d in range(depth + 1)]
    maker.levels = [
        PrefixLevel(starts[d], starts[d + 1], tuple(chain[d]), 0, below, 0, below, d)
        for d in range(depth)
    ]
    return maker.step()


def test_graph_buckets_and_eager_steps_share_variants(recorded: dict[str, Recorder]) -> None:
    """Decode steps of every nesting depth (0-3: level tables 1-3 wide) and mixed steps, run
    eagerly and padded to two CUDA-graph buckets, under split-KV and without: the variants
    of the job above, no more."""
    from test_triton_attention import random_step

    cache = KVCache(1, 400, 16, 2, 64, torch.float16, torch.device("cpu"))
    backend = TritonBackend(cache, num_heads=8, scale=0.125)
    backend.set_graph_limits(max_blocks_per_seq=24, max_depth=3)
    widths: set[tuple[int, int]] = set()
    for seed in range(16):
        rng = random.Random(seed)
        backend.target_programs = (0, 64)[seed % 2]
        mixed = seed < 4
        step = random_step(rng, 16, 1 + seed % 3) if mixed else decode_rows(rng, seed % 4)
        metas = [backend.prepare(step)]
        if not mixed:  # decode steps also as graph buckets
            metas += [backend.prepare(step, backend.graph_shape(bucket)) for bucket in (8, 16)]
        for meta in metas:
            widths.add((meta.block_table.shape[1], meta.seq_levels.shape[1]))
            q = torch.randn(meta.slot_mapping.shape[0], 8, 64, dtype=torch.float16)
            kv = torch.randn(meta.slot_mapping.shape[0], 2, 64, dtype=torch.float16)
            backend.forward(0, q, kv, kv, meta)
    assert len(widths) >= 6 and {depth for _, depth in widths} == {1, 2, 3}
    for name in KERNELS:
        assert len(variants(ORIGINALS[name], recorded[name].launches)) == EXPECTED.get(name, 1)
