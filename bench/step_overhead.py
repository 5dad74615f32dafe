"""Host work per engine step, with the model forward replaced by a stub: what the engine does
around the device (scheduling, step inputs, attention metadata, sampling bookkeeping,
detokenizing) at 128, 1,024 and 4,096 running requests.

    python bench/step_overhead.py [--rows 128,1024,4096] [--policies batchllm,fcfs-lru]
                                  [--variants greedy,sampled,long] [--decode-steps 20]

This measures host work only. The stub returns a logits tensor of the right shape (rows,
vocabulary) without computing anything, and the attention metadata is the Triton backend's
(``TritonMetadata.build``, what the GPU job builds every step), on the CPU. The sampler's tensor
ops (argmax, noise, penalties on the logits: device work on a GPU, run here on the CPU) are timed
apart and left out of the host total. The tokenizer is SmolLM2's (the default model's), so the
detokenizer does its real work.

The job is the GPU job's shape (``/docs`` of the project: 16 requests per group sharing a
2,000-token prefix, each with its own 200-token suffix), with the prefix nested: a 500-token
system prompt shared by every request above a 1,500-token document per group. ``long`` makes
every prompt 4x longer and the prefill budget per step 4x larger, so that its prefill phase
takes as many steps and its decode steps are measured with outputs as long as ``greedy``'s (the
requests admitted first decode while the rest are prefilled: with the same budget their outputs
would be 2-3x longer when decode is measured, and the comparison would be of output lengths,
whose lists a step appends to, not of prompt lengths); ``sampled`` samples a quarter of the rows
(temperature, top-p, top-k) with repetition, frequency and presence penalties. Outputs never end
(EOS is masked in the stub's logits), so every request runs until the measurement ends.
``fcfs-lru`` runs the same requests in file order with its prefix cache and a request cap equal
to the row count.

Each configuration runs in a fresh process (where one run left objects in the heap must not
change the next one's memory access) through the prefill phase (its mixed steps: prefill chunks
beside decode rows, ``--max-num-batched-tokens`` prefill tokens each) and then
``--decode-steps`` pure decode steps with every request running; the table gives medians, in
host milliseconds, per part, and the mean host total (full garbage collections, rare and long,
move the mean, not the median: give it 100 decode steps or more). Times are the engine
thread's CPU time by default (``--clock thread``: robust on a shared machine, where a
descheduled process would count other processes' work as its own); ``--clock wall`` gives wall
time, the same figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
from common import machine, table

from prefixbatch import SamplingParams
from prefixbatch.config import EngineConfig, ModelConfig
from prefixbatch.engine import LLMEngine
from prefixbatch.execution import step_sampler
from prefixbatch.execution.attention.backend import AttentionBackend
from prefixbatch.execution.attention.resident_table import ResidentTable
from prefixbatch.execution.attention.step import AttentionStep
from prefixbatch.execution.attention.triton_metadata import TritonMetadata
from prefixbatch.execution.fused_ops import fused_kernels
from prefixbatch.execution.kv_cache import KVCache
from prefixbatch.execution.model_runner import ModelRunner
from prefixbatch.execution.penalties import LogitsProcessing, PenaltyState
from prefixbatch.execution.sampler import torch_argmax
from prefixbatch.execution.upload import Staged
from prefixbatch.loading.builder import LoadedModel
from prefixbatch.loading.limits import EngineLimits
from prefixbatch.loading.model_config import read_model_config
from prefixbatch.loading.model_source import model_name, resolve_model
from prefixbatch.planning.plan import make_plan
from prefixbatch.planning.token_arrays import TokenArrays, TokenArraysBuilder
from prefixbatch.scheduling.request_source import CompactRequests
from prefixbatch.tokenizer import Tokenizer

# The issue's figures (1,024 decode rows, batchllm, greedy, before this work), for comparison.
ISSUE_MS = {
    "sampler": 72.0,
    "inputs": 22.0,
    "metadata": 18.0,
    "detokenizer": 10.0,
    "scheduler": 9.0,
    "host total": 158.0,
}
PARTS = ("scheduler", "inputs", "metadata", "sampler", "detokenizer", "other")
GQA_GROUP = 4  # query heads per KV head of the 8B Llama-3 shape (32 / 8): sizes Triton tiles


class StubModel:
    """The model forward replaced: logits (rows, vocab) from a fixed random buffer, EOS masked,
    a different window of the buffer each step so the chosen tokens vary."""

    def __init__(self, vocab: int, max_rows: int, eos_ids: tuple[int, ...]) -> None:
        self.window = 61
        self.buffer = torch.randn(max_rows + self.window, vocab)
        self.buffer[:, list(eos_ids)] = float("-inf")
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: Any,
                 meta: Any, logits_rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
        self.calls += 1
        start = self.calls % self.window
        return self.buffer[start : start + logits_rows.shape[0]]


class TritonMetadataOnly(AttentionBackend):
    """The Triton backend's host side: builds its metadata for every step, attends nothing.
    Its block tables' "device" copies are kept by row diffs, as on CUDA (the CPU backend reads
    the host arrays in place)."""

    shares_prefix = True

    def __init__(self, cache: KVCache, num_heads: int, scale: float) -> None:
        super().__init__(cache, num_heads, scale)
        cpu = torch.device("cpu")
        self.resident = (ResidentTable(cpu, mirror=True), ResidentTable(cpu, mirror=True))

    def stage(self, step: AttentionStep) -> Staged[TritonMetadata]:
        return TritonMetadata.stage(step, GQA_GROUP, resident=self.resident)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: Any) -> torch.Tensor:  # fmt: skip
        raise AssertionError("the stub model never calls attention")


@dataclass(frozen=True)
class Job:
    rows: int
    policy: str
    variant: str
    prefix: int = 2000
    suffix: int = 200

    @property
    def scale(self) -> int:
        return 4 if self.variant == "long" else 1

    def prompts(self) -> TokenArrays:
        """rows / 16 groups of 16: a shared system prompt > a document per group > a suffix
        per request; shuffled (seed 0). Arrays, as a job holds its batch (no int object per
        token in the process: what the engine keeps of a running request is all that adds to
        its heap)."""
        rng = random.Random(0)
        n = self.prefix * self.scale

        def tokens(k: int) -> np.ndarray:
            return np.array([rng.randrange(100, 40000) for _ in range(k)], dtype=np.int32)

        system = tokens(n // 4)
        docs = [np.concatenate([system, tokens(n - n // 4)]) for _ in range(self.rows // 16)]
        suffixes = [tokens(self.suffix * self.scale) for _ in range(self.rows)]
        order = list(range(self.rows))
        rng.shuffle(order)
        builder = TokenArraysBuilder()
        for i in order:
            builder.append(np.concatenate([docs[i // 16], suffixes[i]]))
        return builder.build()

    def requests(self, max_tokens: int) -> CompactRequests:
        """The batch as a job hands it to the engine."""
        prompts = self.prompts()
        sets = (self.params(1, max_tokens), self.params(0, max_tokens))
        param_ids = (np.arange(len(prompts)) % 4 == 0).astype(np.int32)
        if self.variant != "sampled":
            sets, param_ids = sets[:1], np.zeros(len(prompts), dtype=np.int32)
        return CompactRequests(prompts, sets, param_ids, np.arange(len(prompts)))

    def params(self, i: int, max_tokens: int) -> SamplingParams:
        if self.variant == "sampled" and i % 4 == 0:
            return SamplingParams(
                max_tokens=max_tokens, temperature=0.8, top_p=0.9, top_k=50,
                repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.3,
            )  # fmt: skip
        return SamplingParams(max_tokens=max_tokens, temperature=0)


class StubWorker:
    """What an engine reads from its worker, with the stub model and a metadata-only backend
    over a KV pool of 1 element per slot (nothing is read or written)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, rows: int, eos: tuple[int, ...]):
        self.device = torch.device("cpu")
        self.num_blocks = num_blocks
        cache = KVCache(1, num_blocks, 16, 1, 1, torch.float32, self.device)
        self.backend = TritonMetadataOnly(cache, GQA_GROUP, 1.0)
        self.model = StubModel(cfg.vocab_size, rows, eos)
        kernels = fused_kernels()  # the compiled row argmax (torch's CPU argmax is a slow loop)
        self.argmax = torch_argmax if kernels is None else kernels.argmax_rows
        self.greedy_head = None  # as on a GPU: every step samples from the logits
        self.kv_bytes = 0

    def runner(self, share_prefix_attention: bool, min_shared: int | None) -> ModelRunner:
        return ModelRunner(
            self.model, self.backend, 16, self.device, share_prefix_attention, min_shared
        )


def stub_engine(job: Job, batched_tokens: int, max_tokens: int) -> LLMEngine:
    """An engine on SmolLM2's tokenizer and config with the stub forward and a KV pool sized for
    every request's prompt and output."""
    source = resolve_model(None)
    prompt = (job.prefix + job.suffix) * job.scale
    cfg = replace(read_model_config(source), max_position=prompt + max_tokens + 64)
    num_blocks = job.rows * -(-(prompt + max_tokens) // 16) + 64
    config = EngineConfig(
        device="cpu",
        block_size=16,
        policy=job.policy,
        max_num_batched_tokens=batched_tokens,
        max_num_seqs=job.rows,
        cuda_graphs=False,
    )
    tokenizer = Tokenizer(source.path)
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, tokenizer.eos_token_id]))
    loaded = LoadedModel(
        config=config,
        source=source,
        model_config=cfg,
        tokenizer=tokenizer,
        worker=StubWorker(cfg, num_blocks, job.rows, eos),  # type: ignore[arg-type]
        limits=EngineLimits.of(config, cfg, num_blocks),
        eos_ids=eos,
        name=model_name(None),
    )
    return LLMEngine(config, loaded)


@dataclass
class StepTimes:
    """Seconds per part of the step being timed, plus the step's kind."""

    parts: dict[str, float] = field(default_factory=dict)
    kind: str = ""


class Probe:
    """Wraps engine methods to time each part of every step (and the stub forward and the
    sampler's tensor ops, which are left out of the host total)."""

    def __init__(self, engine: LLMEngine, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.current = StepTimes()
        self.steps: list[StepTimes] = []
        e = engine
        self._wrap(e.scheduler, "schedule", "scheduler", self._classify)
        self._wrap(e.scheduler, "advance", "scheduler")
        self._wrap(e.scheduler, "resolve", "scheduler")
        self._wrap(e.runner, "inputs", "inputs")
        self._wrap(e.backend, "stage", "metadata")
        self._wrap(e.runner, "model", "forward")
        self._wrap(e.sampler, "prepare", "sampler")
        self._wrap(e.sampler, "sample_async", "sampler")
        self._wrap(e.sampler, "collect", "sampler")
        self._wrap(e._texts, "update", "detokenizer")
        # Tensor ops on the logits (device work on a GPU): inside the sampler's time.
        self._wrap(step_sampler, "sample", "device")
        self._wrap(LogitsProcessing, "apply", "device")
        self._wrap(LogitsProcessing, "record", "device")
        self._wrap(PenaltyState, "fill", "device")

    def _wrap(self, owner: Any, name: str, part: str,
              seen: Callable[[Any], None] | None = None) -> None:  # fmt: skip
        fn = getattr(owner, name)

        def timed(*args: Any, **kw: Any) -> Any:
            start = self.clock()
            out = fn(*args, **kw)
            parts = self.current.parts
            parts[part] = parts.get(part, 0.0) + self.clock() - start
            if seen is not None:
                seen(out)
            return out

        setattr(owner, name, timed)

    def _classify(self, step: Any) -> None:
        prefill = any(
            n > 1 or s.computed < s.num_prompt for s, n in zip(step.seqs, step.num_tokens)
        )
        decode = any(
            n == 1 and s.computed >= s.num_prompt for s, n in zip(step.seqs, step.num_tokens)
        )
        self.current.kind = "mixed" if prefill and decode else "decode" if decode else "prefill"

    def step(self, engine: LLMEngine) -> StepTimes:
        self.current = StepTimes()
        start = self.clock()
        engine.step()
        wall = self.clock() - start
        p = self.current.parts
        p["sampler"] = p.get("sampler", 0.0) - p.get("device", 0.0)
        p["inputs"] = p.get("inputs", 0.0)
        timed = sum(p.get(k, 0.0) for k in PARTS[:-1])
        p["other"] = wall - timed - p.get("forward", 0.0) - p.get("device", 0.0)
        p["host total"] = wall - p.get("forward", 0.0) - p.get("device", 0.0)
        self.steps.append(self.current)
        return self.current


def run(
    job: Job, decode_steps: int, batched_tokens: int, clock: Callable[[], float]
) -> dict[str, dict[str, float]]:
    """Median ms per part of the job's mixed steps and of its pure decode steps."""
    max_tokens = 4096
    engine = stub_engine(job, batched_tokens * job.scale, max_tokens)
    requests = job.requests(max_tokens)
    plans = job.policy == "batchllm"
    plan = make_plan(requests.prompts, requests.max_tokens(), 16) if plans else None
    engine.add_requests(requests, plan)
    probe = Probe(engine, clock)
    while len(engine.scheduler.running) < job.rows or engine.scheduler.waiting:
        probe.step(engine)
    for _ in range(decode_steps):
        probe.step(engine)
    out = {}
    for kind in ("mixed", "decode"):
        steps = [s for s in probe.steps if s.kind == kind]
        if kind == "decode":
            steps = steps[-decode_steps:]
        if steps:
            keys = (*PARTS, "host total", "device")
            out[kind] = {
                k: 1000 * statistics.median(s.parts.get(k, 0.0) for s in steps) for k in keys
            }
            # the mean shows what medians hide: full garbage collections every few dozen steps
            out[kind]["mean total"] = 1000 * statistics.mean(s.parts["host total"] for s in steps)
            out[kind]["steps"] = len(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="128,1024,4096")
    parser.add_argument("--policies", default="batchllm,fcfs-lru")
    parser.add_argument("--variants", default="greedy,sampled,long")
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--suffix", type=int, default=200)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"machine: {machine()}")
    print(
        f"host ms per step (median, {args.clock} clock), model forward stubbed; "
        "sampler tensor ops apart ('device')"
    )
    rows = []
    for n in map(int, args.rows.split(",")):
        for policy in args.policies.split(","):
            for variant in args.variants.split(","):
                job = Job(n, policy, variant, args.prefix, args.suffix)
                # Each configuration in a fresh process: one run's heap (where its objects
                # sit, what it freed) must not shape the next one's memory access.
                with get_context("spawn").Pool(1) as pool:
                    work = (job, args.decode_steps, args.max_num_batched_tokens, clock)
                    result = pool.apply(run, work)
                for kind, ms in result.items():
                    row = {"rows": n, "policy": policy, "variant": variant, "step": kind}
                    row |= {k: f"{ms[k]:.2f}" for k in (*PARTS, "host total", "mean total")}
                    row["device"] = f"{ms['device']:.2f}"
                    row["steps"] = int(ms["steps"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    issue = {"rows": 1024, "policy": "batchllm", "variant": "issue #23 (before)", "step": "decode"}
    issue |= {k: f"{ISSUE_MS[k]:.2f}" if k in ISSUE_MS else "" for k in (*PARTS, "host total")}
    rows.append(issue | {"mean total": "", "device": "", "steps": ""})
    print(table(rows))


if __name__ == "__main__":
    main()
