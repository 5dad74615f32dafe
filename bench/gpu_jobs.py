"""Stages 3-5 of the GPU check: greedy parity against transformers, the 8B shared-prefix job
under batchllm and fcfs-lru, and transformers' continuous batching on the same job.

Models are built from configs with random weights (normal, std 0.02) directly in their dtype
on the device (``from_config`` under the dtype: no fp32 copy), so nothing is downloaded; our
engine loads the live model's tensors through ``InMemorySource`` (no 16 GB written to disk)
and the transformers model is dropped before the jobs run.
"""

from __future__ import annotations

import gc
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import timed
from gpu_common import PEAK_FLOPS, Recorder, Sizes, job_prompts, useful_flops

from prefixbatch.config import EngineConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.execution.attention import triton_kernels
from prefixbatch.execution.attention.triton_backend import triton_available
from prefixbatch.execution.model_runner import ModelRunner
from prefixbatch.loading.builder import load_model
from prefixbatch.loading.model_source import ModelSource
from prefixbatch.outputs import Request
from prefixbatch.sampling_params import SamplingParams


class InMemorySource(ModelSource):
    """A model directory holding config and tokenizer, with the weights taken from a live
    transformers model instead of safetensors files."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        super().__init__(path)
        object.__setattr__(self, "model", model)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.state_dict().items()  # type: ignore[attr-defined]


def hf_model(config: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A transformers Llama with random weights made in ``dtype`` on ``device`` (seed 0), with
    no EOS token (every generation runs to its length)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, initializer_range=0.02, eos_token_id=None, bos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters the FLOP count of a token uses: all but the embedding and the LM head."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed_tokens" not in name and "lm_head" not in name
    )


def save_config_and_tokenizer(model: torch.nn.Module, path: Path) -> None:
    """config.json and a word-level tokenizer over the whole vocabulary (outputs decode to
    ``w<id>`` words; the job's prompts are token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.config.save_pretrained(str(path))  # type: ignore[attr-defined]
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}  # type: ignore[attr-defined]
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))


def our_engine(model: torch.nn.Module, **config: Any) -> LLMEngine:
    """Our engine over ``model``'s weights, with the Triton attention backend (CUDA, or the
    CPU interpreter in a dry run); the engine keeps no reference to ``model``."""
    path = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    save_config_and_tokenizer(model, path)
    device = torch.device(config["device"])
    backend = "triton" if triton_available(device) else "auto"
    cfg = EngineConfig(model=str(path), attention_backend=backend, **config)
    loaded = load_model(cfg, InMemorySource(path, model))
    return LLMEngine(cfg, replace(loaded, source=ModelSource(path)))


def generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    requests = [Request(i, p, params) for i, p in enumerate(prompts)]
    outs = sorted(engine.generate(requests), key=lambda o: o.index)
    return [o.output_token_ids for o in outs]


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy continuation, one prompt at a time (no padding)."""
    dev = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            gen = model.generate(  # type: ignore[attr-defined]
                ids, max_new_tokens=n, do_sample=False, pad_token_id=0
            )
            outs.append(gen[0, len(p) :].tolist())
            if len(outs[-1]) != n:
                raise RuntimeError(f"transformers made {len(outs[-1])} tokens, not {n}")
    return outs


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the length when equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parity_row(sizes: Sizes, dtype: torch.dtype) -> dict[str, Any]:
    model = hf_model(sizes.parity_config, dtype, sizes.device)
    rng = random.Random(1)
    vocab = sizes.parity_config["vocab_size"]
    head = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [
        (head if i % 2 else []) + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))]
        for i in range(sizes.parity_prompts)
    ]
    expected = hf_greedy(model, prompts, sizes.parity_tokens)
    name = str(dtype).removeprefix("torch.")
    engine = our_engine(
        model, device=sizes.device, dtype=name, kv_cache_memory=256 * 2**20, block_size=16,
        cascade_min_prefix=16,
    )  # fmt: skip
    params = SamplingParams(max_tokens=sizes.parity_tokens, temperature=0, ignore_eos=True)
    got = generate(engine, prompts, params)
    firsts = [first_divergence(a, b) for a, b in zip(got, expected)]
    return {
        "check": f"parity {name}",
        "backend": type(engine.backend).__name__,
        "exact": f"{sum(a == b for a, b in zip(got, expected))}/{len(prompts)}",
        "first_divergence_mean": round(statistics.mean(firsts), 1),
        "first_divergence_min": min(firsts),
        "tokens": sizes.parity_tokens,
    }


def parity(sizes: Sizes, rec: Recorder) -> None:
    """Stage 3: fp32 must match token for token; the job's dtype diverges after a while on
    random weights (its statistics)."""
    for dtype in (torch.float32, getattr(torch, sizes.dtype)):
        rec.attempt(f"parity {dtype}", lambda d=dtype: parity_row(sizes, d))


class DecodeTimer:
    """Times the runner's decode steps (every sequence one new token): CUDA events recorded
    around ``ModelRunner.execute`` (graph replays included) and read once at the end, so
    timing adds no synchronisation; ``time.perf_counter`` on the CPU. Also the wall time from
    one decode step's start to the next's (the whole engine step: scheduling, sampling,
    detokenizing)."""

    def __init__(self, runner: ModelRunner, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[tuple[int, Any, Any, float]] = []  # (rows, start, end, wall start)
        execute = runner.execute

        def timed_execute(step: Any, *args: Any) -> torch.Tensor:
            if any(n != 1 for n in step.num_tokens):
                return execute(step, *args)
            wall, start = time.perf_counter(), self._mark()
            logits = execute(step, *args)
            self.steps.append((len(step.num_tokens), start, self._mark(), wall))
            return logits

        runner.execute = timed_execute  # type: ignore[method-assign]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)

    def summary(self) -> dict[str, Any]:
        """Median runner and step time (ms) over the decode steps within 10% of the median
        batch, and that batch."""
        if not self.steps:
            return {"decode_ms": None, "decode_batch": None}
        if self.cuda:
            torch.cuda.synchronize()
        batch = statistics.median(rows for rows, *_ in self.steps)
        near = [i for i, (rows, *_) in enumerate(self.steps) if rows >= 0.9 * batch]
        runner = [self._ms(self.steps[i][1], self.steps[i][2]) for i in near]
        walls = [self.steps[i + 1][3] - self.steps[i][3] for i in near if i + 1 < len(self.steps)]
        return {
            "decode_ms": round(statistics.median(runner), 2),
            "decode_step_ms": round(1e3 * statistics.median(walls), 2) if walls else None,
            "decode_batch": batch,
            "decode_steps": len(self.steps),
        }


def triton_compiles() -> int | None:
    """Compiled variants of our Triton kernels so far (None under the interpreter)."""
    kernels = [
        triton_kernels.prefix_level_kernel,
        triton_kernels.own_kv_kernel,
        triton_kernels.merge_splits_kernel,
        triton_kernels.store_kv_kernel,
    ]
    if not all(hasattr(k, "device_caches") for k in kernels):
        return None
    return sum(len(caches[0]) for k in kernels for caches in k.device_caches.values())


def job_row(name: str, requests: int, wall: float, outputs: int, flops: float) -> dict[str, Any]:
    return {
        "check": name,
        "requests": requests,
        "wall_s": round(wall, 2),
        "output_tokens": outputs,
        "out_tok_s": round(outputs / wall, 1),
        "mfu_pct": round(100 * flops / wall / PEAK_FLOPS, 2),
    }


def run_ours(
    loaded_engine: LLMEngine, policy: str, groups: int, sizes: Sizes, params: int
) -> dict[str, Any]:
    """One job under ``policy`` on the loaded model: its row, decode-step times and the Triton
    compiles it caused (0 when the warm-up covered every variant)."""
    engine = LLMEngine(replace(loaded_engine.config, policy=policy), loaded_engine.loaded)
    prompts = job_prompts(sizes, groups, engine.loaded.model_config.vocab_size)
    sp = SamplingParams(max_tokens=sizes.output_len, temperature=0, ignore_eos=True)
    timer = DecodeTimer(engine.runner, engine.worker.device)
    compiles = triton_compiles()
    outs, wall = timed(lambda: generate(engine, prompts, sp))
    flops = useful_flops(params, sizes, groups)
    row = job_row(policy, len(prompts), wall, sum(map(len, outs)), flops)
    after = triton_compiles()
    return (
        row
        | timer.summary()
        | {
            "steps": engine.stats.steps,
            "groups": engine.stats.groups,
            "prefill_tokens": engine.stats.prefill_tokens_computed,
            "triton_compiles": None if compiles is None or after is None else after - compiles,
        }
    )


def jobs(sizes: Sizes, rec: Recorder) -> None:
    """Stage 4: build the job model and our engine, a warm-up job with the job's shapes under
    both policies (compiles every kernel variant), then each job size under batchllm and
    fcfs-lru."""
    dtype = getattr(torch, sizes.dtype)
    start = time.perf_counter()
    model = hf_model(sizes.job_config, dtype, sizes.device)
    params = non_embedding_params(model)
    engine = our_engine(
        model, device=sizes.device, dtype=sizes.dtype, kv_cache_memory=sizes.kv_cache_memory,
        max_num_batched_tokens=sizes.max_num_batched_tokens,
    )  # fmt: skip
    del model
    gc.collect()
    cuda = sizes.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    rec.record({
        "check": "job model",
        "non_embedding_params": params,
        "backend": type(engine.backend).__name__,
        "load_s": round(time.perf_counter() - start, 1),
        "cuda_graphs": engine.worker.graphs is not None,
        "triton_compiles": triton_compiles(),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
    })  # fmt: skip
    groups, output_len = sizes.warmup
    warm = replace(sizes, output_len=output_len)
    for policy in ("batchllm", "fcfs-lru"):
        rec.attempt(f"warm-up {policy}", lambda p=policy: {
            **run_ours(engine, p, groups, warm, params), "check": f"warm-up {p}"
        })  # fmt: skip
    for groups in sizes.groups:
        for policy in ("batchllm", "fcfs-lru"):
            rec.attempt(policy, lambda p=policy, g=groups: run_ours(engine, p, g, sizes, params))


def transformers_cb(sizes: Sizes, rec: Recorder) -> None:
    """Stage 5: transformers' continuous batching (``generate_batch``, paged sdpa), greedy,
    EOS off, on the smallest job size."""
    from transformers import GenerationConfig

    def run() -> dict[str, Any]:
        model = hf_model(sizes.job_config, getattr(torch, sizes.dtype), sizes.device)
        groups = sizes.groups[0]
        prompts = job_prompts(sizes, groups, sizes.job_config["vocab_size"])
        gen = GenerationConfig(
            max_new_tokens=sizes.output_len, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        warmup = sizes.device == "cuda"
        kwargs: dict[str, Any] = {"generation_config": gen, "warmup": warmup}
        if sizes.hf_cache_blocks is not None:  # on the CPU its default sizing zeroes GiBs
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                num_blocks=sizes.hf_cache_blocks, max_batch_tokens=sizes.max_num_batched_tokens
            )
        with torch.inference_mode():
            outs, wall = timed(lambda: model.generate_batch(inputs=prompts, **kwargs))
        made = sum(len(o.generated_tokens) for o in outs.values())
        flops = useful_flops(non_embedding_params(model), sizes, groups)
        row = job_row("transformers CB", len(prompts), wall, made, flops)
        errors = sum(o.error is not None for o in outs.values())
        return row | {"errors": errors, "includes_warmup": warmup}

    rec.attempt("transformers CB", run)
