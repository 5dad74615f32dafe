"""The engine loop: plan -> schedule -> run the model -> sample -> postprocess, streaming each
request's output as soon as it finishes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EngineConfig, ModelConfig
from .detokenizer import OutputTexts, mask_min_tokens
from .execution.attention.backend import KVCache
from .execution.attention.factory import make_backend
from .execution.layers import rope_inv_freq
from .execution.model_runner import ModelRunner
from .execution.model_source import ModelSource, resolve_model
from .execution.models.decoder import DecoderModel
from .execution.packed_linear import onednn_available
from .execution.sampler import sample
from .outputs import Request, RequestOutput
from .scheduling.block_manager import BlockManager
from .scheduling.scheduler import Scheduler, SchedulerConfig
from .scheduling.sequence import Sequence
from .scheduling.work import build_sequences
from .tokenizer import Tokenizer


class KVBudgetError(ValueError):
    """The KV cache cannot hold even the smallest request."""


@dataclass(frozen=True)
class EngineLimits:
    """What a request must fit: the model's context and the KV pool."""

    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int

    def kv_blocks(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks for the request's prompt and its longest answer (capped by the context)."""
        return math.ceil(min(prompt_len + max_tokens, self.max_model_len) / self.block_size)

    def fits_kv(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether the pool holds the request's prompt and its longest answer."""
        return self.kv_blocks(prompt_len, max_tokens) <= self.num_blocks

    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request cannot run, or None."""
        if prompt_len == 0:
            return "the prompt is empty"
        if prompt_len >= self.max_model_len:
            return (
                f"the prompt has {prompt_len} tokens; the model's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate"
            )
        if not self.fits_kv(prompt_len, max_tokens):
            need = self.kv_blocks(prompt_len, max_tokens)
            return (
                f"the request needs {need} KV blocks and the cache has {self.num_blocks}; "
                "raise --kv-cache-memory"
            )
        return None


@dataclass
class EngineStats:
    """Counters of one ``generate`` call."""

    requests: int = 0
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    cache_hit_tokens: int = 0
    groups: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: EngineStats) -> None:
        """Accumulate another engine's counters (workers of one distributed job)."""
        for name in (
            "requests",
            "prompt_tokens",
            "prefill_tokens_computed",
            "output_tokens",
            "preemptions",
            "steps",
            "cache_hit_tokens",
            "groups",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def prefill_saving(self) -> float:
        return 1 - self.prefill_tokens_computed / self.prompt_tokens if self.prompt_tokens else 0.0


def available_memory() -> int:
    """Bytes of memory available for the KV pool on the CPU (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def kv_pool_blocks(config: EngineConfig, cfg: ModelConfig) -> tuple[int, int]:
    """(blocks in the KV pool, bytes per block) for this config: ``--kv-cache-memory``, or a
    share of free memory (on the CPU at most 4 GiB: the pool is zeroed up front)."""
    per_block = KVCache.bytes_per_block(
        cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, config.torch_dtype
    )
    budget = config.kv_cache_memory
    if budget is None and config.torch_device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(config.torch_device)[0] * config.kv_cache_fraction)
    elif budget is None:
        budget = min(int(available_memory() * config.kv_cache_fraction), 4 * 2**30)
    return budget // per_block, per_block


def model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    """The context a request must fit: ``--max-model-len``, capped by the model's positions."""
    return min(config.max_model_len or cfg.max_position, cfg.max_position)


class LLMEngine:
    """Loads a model and runs batches of tokenized requests through it."""

    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        from transformers import AutoConfig

        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.source = source or resolve_model(config.model)
        self.model_config = ModelConfig.from_hf(AutoConfig.from_pretrained(str(self.source.path)))
        self.tokenizer = Tokenizer(self.source.path)
        self.model = self._load_model()
        cfg = self.model_config
        self.max_model_len = model_len(config, cfg)
        self.num_blocks, per_block = kv_pool_blocks(config, cfg)
        self.kv_bytes = self.num_blocks * per_block
        if self.num_blocks < 1:
            raise KVBudgetError(
                f"--kv-cache-memory {config.kv_cache_memory} bytes holds no KV block "
                f"({per_block} bytes each)"
            )
        self.cache = KVCache(
            cfg.num_layers,
            self.num_blocks,
            config.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
            self.device,
        )
        # Built here, not per job: on the CPU this may compile the decode kernel (once per machine).
        self.backend = make_backend(self.cache, cfg, native=self.cpu_kernels)
        eos = [*cfg.eos_token_ids, self.tokenizer.eos_token_id]
        self.eos_ids = tuple(dict.fromkeys(e for e in eos if e is not None))
        self.stats = EngineStats()

    @property
    def model_name(self) -> str:
        """The name written into outputs: the checkpoint's directory or GGUF file name."""
        if self.config.model is None:
            return "SmolLM2-135M-Instruct"
        return Path(self.config.model).name.removesuffix(".gguf")

    @property
    def cpu_kernels(self) -> bool:
        """Whether the CPU fast paths (oneDNN-packed projections, the compiled decode kernel)
        apply: ``kernels="auto"`` on the CPU in fp32."""
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        return self.config.kernels == "auto" and cpu_fp32

    def _load_model(self) -> DecoderModel:
        with torch.device("meta"):
            model = DecoderModel(self.model_config)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_weights(self.source.weights())
        if self.cpu_kernels and onednn_available():
            model.pack_linears()
        # Buffers are not in the checkpoint: rebuild the fp32 rotary frequencies on the device.
        cfg = self.model_config
        model.rotary.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(self.device)
        return model.eval()

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(
            self.max_model_len,
            self.num_blocks,
            self.config.block_size,
            self.model_config.vocab_size,
        )

    def status(self) -> str:
        """A short note for progress lines (nothing for a single engine)."""
        return ""

    def generate(self, requests: Iterable[Request]) -> Iterator[RequestOutput]:
        """Run requests to completion, yielding each output as soon as it finishes."""
        requests = list(requests)
        self.stats = EngineStats(
            requests=len(requests), prompt_tokens=sum(len(r.prompt_token_ids) for r in requests)
        )
        if not requests:
            return
        cfg = self.config
        blocks = BlockManager(
            self.num_blocks, cfg.block_size, enable_prefix_cache=cfg.policy == "fcfs-lru"
        )
        cap = cfg.max_num_seqs if cfg.policy != "batchllm" else None
        scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_batched_tokens, cap, self.max_model_len),
            blocks,
            self.eos_ids,
        )
        work = build_sequences(requests, cfg.policy, cfg.block_size, cfg.seed)
        self.stats.groups = len(work.groups)
        runner = ModelRunner(
            self.model,
            self.backend,
            cfg.block_size,
            self.device,
            share_prefix_attention=cfg.policy == "batchllm" and self.backend.shares_prefix,
            min_shared=cfg.cascade_min_prefix,
        )
        texts = OutputTexts(self.tokenizer.hf, work.requests)
        for seq in work.sequences:
            scheduler.add(seq)
        while scheduler.has_work:
            step = scheduler.schedule()
            if not step.seqs:
                raise KVBudgetError(
                    "the KV cache is too small to make progress; raise --kv-cache-memory"
                )
            logits = runner.execute(step)
            sampling = [receiver for _, receiver in step.samples]
            mask_min_tokens(logits, sampling, self.eos_ids)
            tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
            finished = scheduler.postprocess(step, tokens)
            finished += texts.update(sampling, scheduler.finish)
            self.stats.steps += 1
            for seq in finished:
                yield self._output(seq, work.requests[seq.seq_id], texts.pop(seq))
        self.stats.prefill_tokens_computed = scheduler.prefill_tokens_computed
        self.stats.preemptions = scheduler.num_preemptions
        self.stats.cache_hit_tokens = blocks.cache_hits * cfg.block_size

    def _output(self, seq: Sequence, request: Request, text: str) -> RequestOutput:
        self.stats.output_tokens += seq.num_output
        return RequestOutput(
            request.index,
            request.prompt_token_ids,
            seq.output_tokens,
            text,
            seq.finish_reason or "stop",
            seq.preemptions,
        )
