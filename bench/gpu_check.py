"""The GPU check of issue #12 in one call (< 8 minutes on an H200): greedy parity against
transformers, then the 8B Llama-3-shaped shared-prefix job of docs GPU.md under batchllm and
fcfs-lru at 128 and 1,024 requests, and transformers' continuous batching on the 128 case.

The models are built from configs with random weights on the device (no download); prompts are
token ids (G groups x 16 requests: a shared 2,000-token prefix + a 200-token suffix, shuffled;
100 output tokens each, greedy, EOS ignored). Each result is appended to ``--out`` as one JSON
line as soon as it is measured, so a timeout keeps what finished; the table is printed at the
end. MFU counts useful FLOPs, 2 x parameters x (unique prefill tokens + output tokens), against
800 TFLOP/s. ``--dry-run`` runs the same code at tiny sizes on the CPU in seconds.

    PYTHONPATH=src python bench/gpu_check.py --out gpu_check.jsonl [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import table, timed

from prefixbatch.config import EngineConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.execution.attention.triton_backend import triton_available
from prefixbatch.loading.builder import load_model
from prefixbatch.loading.model_source import ModelSource
from prefixbatch.outputs import Request
from prefixbatch.sampling_params import SamplingParams

PEAK_FLOPS = 800e12  # H200 bf16 dense matmul, measured (GPU.md)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    device: str
    parity_config: dict[str, Any]
    job_config: dict[str, Any]
    parity_prompts: int
    parity_tokens: int
    groups: tuple[int, ...]  # prefix groups per job size (x per_group requests)
    per_group: int
    prefix_len: int
    suffix_len: int
    output_len: int
    kv_cache_memory: int
    max_num_batched_tokens: int
    hf_cache_blocks: int | None  # transformers CB's paged cache (None: it sizes its own)
    # The dry run takes the PyTorch paths a GPU takes, not the CPU kernels (compiled on first use).
    engine_options: dict[str, Any]


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
TINY = dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)

GPU = Sizes(
    "cuda", SMALL, LLAMA3_8B, 16, 24, (8, 64), 16, 2000, 200, 100, 48 * 2**30, 8192, None, {}
)
DRY = Sizes("cpu", TINY, TINY, 4, 8, (2, 4), 4, 48, 8, 8, 64 * 2**20, 256, 64, {"kernels": "torch"})


class InMemorySource(ModelSource):
    """A model directory holding config and tokenizer, with the weights taken from a live
    transformers model instead of safetensors files (saves writing 16 GB)."""

    def __init__(self, path: Path, model: torch.nn.Module) -> None:
        super().__init__(path)
        object.__setattr__(self, "model", model)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.model.state_dict().items()  # type: ignore[attr-defined]


def hf_model(config: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A transformers Llama with random weights (normal, std 0.02) made on ``device``, with no
    EOS token (every generation runs to its length without masking a token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, initializer_range=0.02, eos_token_id=None, bos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


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


def our_engine(model: torch.nn.Module, path: Path, **config: Any) -> tuple[LLMEngine, str]:
    """Our engine over ``model``'s weights, with the Triton attention backend where it runs
    (CUDA, or the CPU interpreter in a dry run); returns the engine and the backend note."""
    save_config_and_tokenizer(model, path)
    source = InMemorySource(path, model)
    device = torch.device(config.get("device", "cuda"))
    backend = "triton" if triton_available(device) else "auto"
    cfg = EngineConfig(model=str(path), attention_backend=backend, **config)
    engine = LLMEngine(cfg, load_model(cfg, source))
    note = f"attention backend: {type(engine.backend).__name__}"
    print(f"  engine: {note}", flush=True)
    return engine, note


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


def check_parity(sizes: Sizes, work: Path, dtype: torch.dtype) -> dict[str, Any]:
    model = hf_model(sizes.parity_config, dtype, sizes.device)
    rng = random.Random(1)
    vocab = sizes.parity_config["vocab_size"]
    head = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [
        (head if i % 2 else []) + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))]
        for i in range(sizes.parity_prompts)
    ]
    expected = hf_greedy(model, prompts, sizes.parity_tokens)
    dtype_name = str(dtype).removeprefix("torch.")
    engine, _ = our_engine(
        model, work / f"parity-{dtype_name}", device=sizes.device, dtype=dtype_name,
        kv_cache_memory=256 * 2**20, block_size=16, cascade_min_prefix=16, **sizes.engine_options,
    )  # fmt: skip
    params = SamplingParams(max_tokens=sizes.parity_tokens, temperature=0, ignore_eos=True)
    got = generate(engine, prompts, params)
    firsts = [first_divergence(a, b) for a, b in zip(got, expected)]
    return {
        "check": f"parity {dtype_name}",
        "exact": f"{sum(a == b for a, b in zip(got, expected))}/{len(prompts)}",
        "first_divergence_mean": round(statistics.mean(firsts), 1),
        "first_divergence_min": min(firsts),
        "tokens": sizes.parity_tokens,
    }


def job_prompts(sizes: Sizes, groups: int, vocab: int) -> list[list[int]]:
    """groups x per_group prompts: a shared prefix + an own suffix each, shuffled (seed 0)."""
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


class StepTimer:
    """Times every forward of the engine's model (synchronised); a decode step is one whose
    logits have a row per input token."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.decode: list[tuple[int, float]] = []  # (batch, seconds)
        self._start = 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.sync()
        self._start = time.perf_counter()

    def _after(self, _module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        self.sync()
        if out.shape[0] == args[0].shape[0]:
            self.decode.append((args[0].shape[0], time.perf_counter() - self._start))

    def summary(self) -> dict[str, Any]:
        if not self.decode:
            return {"decode_ms": None, "decode_batch": None}
        batch = statistics.median(b for b, _ in self.decode)
        near = [s for b, s in self.decode if b >= 0.9 * batch] or [s for _, s in self.decode]
        return {"decode_ms": round(1e3 * statistics.median(near), 2), "decode_batch": batch}


def useful_flops(params: int, sizes: Sizes, groups: int) -> float:
    """2 x parameters x (unique prefill tokens + output tokens) of a job of ``groups`` groups."""
    requests = groups * sizes.per_group
    unique = groups * sizes.prefix_len + requests * sizes.suffix_len
    return 2.0 * params * (unique + requests * sizes.output_len)


def job_row(name: str, groups: int, sizes: Sizes, wall: float, outputs: int, flops: float) -> dict:
    return {
        "check": name,
        "requests": groups * sizes.per_group,
        "wall_s": round(wall, 2),
        "output_tokens": outputs,
        "out_tok_s": round(outputs / wall, 1),
        "mfu_pct": round(100 * flops / wall / PEAK_FLOPS, 2),
    }


def run_ours(
    engine: LLMEngine, timer: StepTimer, policy: str, groups: int, sizes: Sizes, params: int
) -> dict[str, Any]:
    engine = LLMEngine(replace(engine.config, policy=policy), engine.loaded)
    prompts = job_prompts(sizes, groups, engine.loaded.model_config.vocab_size)
    sp = SamplingParams(max_tokens=sizes.output_len, temperature=0, ignore_eos=True)
    timer.decode.clear()
    outs, wall = timed(lambda: generate(engine, prompts, sp))
    flops = useful_flops(params, sizes, groups)
    row = job_row(policy, groups, sizes, wall, sum(map(len, outs)), flops)
    row |= timer.summary() | {"steps": engine.stats.steps, "groups": engine.stats.groups}
    return row


def run_hf_continuous(
    model: torch.nn.Module, groups: int, sizes: Sizes, params: int, warmup: bool
) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``, paged sdpa), greedy, EOS off."""
    from transformers import GenerationConfig

    prompts = job_prompts(sizes, groups, model.config.vocab_size)  # type: ignore[attr-defined]
    gen = GenerationConfig(
        max_new_tokens=sizes.output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    kwargs: dict[str, Any] = {"generation_config": gen, "warmup": warmup}
    if sizes.hf_cache_blocks is not None:  # on the CPU its default sizing zeroes GiBs
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=sizes.hf_cache_blocks, max_batch_tokens=sizes.max_num_batched_tokens
        )
    run = model.generate_batch  # type: ignore[attr-defined]
    with torch.inference_mode():
        outs, wall = timed(lambda: run(inputs=prompts, **kwargs))
    made = sum(len(o.generated_tokens) for o in outs.values())
    row = job_row("transformers CB", groups, sizes, wall, made, useful_flops(params, sizes, groups))
    errors = sum(o.error is not None for o in outs.values())
    return row | {"errors": errors, "includes_warmup": warmup}


class Recorder:
    """Appends each result to the JSON-lines file as it comes; keeps going after a failure."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row}", flush=True)

    def attempt(self, name: str, fn: Callable[[], dict[str, Any]]) -> bool:
        print(f"{name} ... ({time.perf_counter() - self.start:.0f} s)", flush=True)
        try:
            self.record(fn())
            return True
        except Exception as e:  # a failed check must not lose the others
            self.record({"check": name, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
            return False


def environment(sizes: Sizes) -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_cuda = sizes.device == "cuda"
    return {
        "check": "environment",
        "device": torch.cuda.get_device_name() if on_cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
    }


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """batchllm / fcfs-lru and ours / transformers speed-ups per job size."""
    wall = {(r["check"], r.get("requests")): r["wall_s"] for r in rows if "wall_s" in r}
    out = []
    for (name, n), w in wall.items():
        if name == "batchllm" and ("fcfs-lru", n) in wall:
            out.append({"check": f"batchllm vs fcfs-lru, {n}", "speedup": wall["fcfs-lru", n] / w})
        if name != "transformers CB" and ("transformers CB", n) in wall:
            ratio = wall["transformers CB", n] / w
            out.append({"check": f"{name} vs transformers, {n}", "speedup": ratio})
    return [r | {"speedup": round(r["speedup"], 2)} for r in out]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.jsonl"))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run")
    rec = Recorder(args.out)
    rec.attempt("environment", lambda: environment(sizes))
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for dtype in (torch.float32, torch.bfloat16):  # the cheap check first
        rec.attempt(f"parity {dtype}", lambda d=dtype: check_parity(sizes, work, d))
    print("building the job model ...", flush=True)
    model = hf_model(sizes.job_config, torch.bfloat16, sizes.device)
    params = sum(p.numel() for p in model.parameters())
    engine, note = our_engine(
        model, work / "job", device=sizes.device, dtype="bfloat16",
        kv_cache_memory=sizes.kv_cache_memory,
        max_num_batched_tokens=sizes.max_num_batched_tokens, **sizes.engine_options,
    )  # fmt: skip
    rec.record({"check": "job model", "parameters": params, "backend": note})
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    generate(engine, [[5, 6, 7, 8]] * 2, warm)  # CUDA context, cuBLAS handles
    timer = StepTimer(engine.worker.model, engine.worker.device)
    small, large = sizes.groups
    for policy in ("batchllm", "fcfs-lru"):
        rec.attempt(policy, lambda p=policy: run_ours(engine, timer, p, small, sizes, params))
    hf_run = partial(run_hf_continuous, model, small, sizes, params, not args.dry_run)
    rec.attempt("transformers CB", hf_run)
    # Drop the last references to the HF model (the in-memory source holds it).
    engine = LLMEngine(
        engine.config, replace(engine.loaded, source=ModelSource(engine.loaded.source.path))
    )
    del model, hf_run
    gc.collect()
    if sizes.device == "cuda":
        torch.cuda.empty_cache()
    for policy in ("batchllm", "fcfs-lru"):
        rec.attempt(policy, lambda p=policy: run_ours(engine, timer, p, large, sizes, params))
    for row in ratios(rec.rows):
        rec.record(row)
    for key in ("torch", "exact", "wall_s", "speedup", "error"):  # one table per kind of row
        rows = [r for r in rec.rows if key in r]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        print(table([{k: r.get(k, "") for k in columns} for r in rows]) if rows else "")
    return rec.rows


if __name__ == "__main__":
    main()
