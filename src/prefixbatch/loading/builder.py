"""Build everything an engine runs on, once: model, tokenizer, KV cache, attention backend.

``load_model(config)`` resolves the checkpoint, builds the model on the meta device, loads (and on
the CPU packs) its weights, sizes and allocates the KV pool, and picks the attention backend from
the registry. The engine, the plan command and Ray workers all start here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import EngineConfig, ModelConfig
from ..errors import ModelNotFoundError
from ..execution.attention.backend import AttentionBackend
from ..execution.attention.registry import select_backend
from ..execution.attention.step import AttentionStep, SeqStep
from ..execution.cuda_graphs import DecodeGraphRunner, GraphMetadataHooks
from ..execution.fused_ops import fused_kernels
from ..execution.host_memory import keep_freed_memory
from ..execution.kv_cache import KVCache, kv_pool_blocks
from ..execution.kv_memory import gpu_kv_blocks
from ..execution.layers import rope_inv_freq
from ..execution.models.decoder import DecoderModel
from ..execution.packed_linear import onednn_available
from ..execution.sampler import SamplingTensors, sample
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer
from .limits import EngineLimits
from .model_source import ModelSource, model_name, resolve_model


def read_model_config(source: ModelSource) -> ModelConfig:
    """The checkpoint's normalised config; raises ``UnsupportedModelError``, or
    ``ModelNotFoundError`` when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(source.path))
    except (OSError, ValueError) as e:  # transformers' errors for a missing or broken config
        raise ModelNotFoundError(f"cannot read the model config in {source.path}: {e}") from e
    return ModelConfig.from_hf(hf)


def cpu_fast_paths(config: EngineConfig) -> bool:
    """Whether the CPU fast paths apply: ``kernels="auto"`` on the CPU in fp32."""
    cpu_fp32 = config.torch_device.type == "cpu" and config.torch_dtype == torch.float32
    return config.kernels == "auto" and cpu_fp32


@dataclass(frozen=True)
class LoadedModel:
    """What an engine is built on; shared by engines that differ only in scheduling policy."""

    config: EngineConfig
    source: ModelSource
    model_config: ModelConfig
    tokenizer: Tokenizer
    model: DecoderModel
    cache: KVCache
    backend: AttentionBackend
    limits: EngineLimits
    eos_ids: tuple[int, ...]
    name: str  # written into outputs
    graphs: DecodeGraphRunner | None = None  # decode steps as CUDA graphs (backend permitting)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.cache.k.numel() * self.cache.k.element_size()


def build_model(config: EngineConfig, source: ModelSource, cfg: ModelConfig) -> DecoderModel:
    """The decoder on ``config``'s device and dtype with the checkpoint's weights."""
    device = config.torch_device
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model = model.to_empty(device=device).to(config.torch_dtype)
    model.load_weights(source.weights())
    if cpu_fast_paths(config):
        keep_freed_memory()
        if onednn_available():
            model.pack_linears()
        kernels = fused_kernels()
        if kernels is not None:
            model.use_fused_kernels(kernels)
    # Buffers are not in the checkpoint: rebuild the fp32 rotary frequencies on the device.
    model.rotary.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
    return model.eval()


def largest_step(
    model: DecoderModel, config: EngineConfig, cfg: ModelConfig, backend_name: str
) -> Callable[[], object]:
    """One forward of the largest step the scheduler makes (``max_num_batched_tokens`` prefill
    tokens) sampling ``max_num_seqs`` rows, through a throwaway cache just big enough: run
    before the KV pool exists, it measures the weights' and activations' peak memory."""

    def run() -> object:
        tokens, bs = config.max_num_batched_tokens, config.block_size
        blocks = -(-tokens // bs)
        device = config.torch_device
        cache = KVCache(
            cfg.num_layers, blocks, bs, cfg.num_kv_heads, cfg.head_dim, config.torch_dtype, device
        )
        backend = select_backend(backend_name, cache, cfg.num_heads, cfg.head_dim**-0.5)
        step = AttentionStep.of([SeqStep(0, tokens, tokens, tuple(range(blocks)))], block_size=bs)
        rows = min(tokens, config.max_num_seqs)
        logits = model(
            torch.zeros(tokens, dtype=torch.long, device=device),
            torch.arange(tokens, device=device),
            backend,
            backend.prepare(step),
            torch.arange(tokens - rows, tokens, device=device),
        )
        params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9)] * rows
        return sample(logits, SamplingTensors.build(params, [0] * rows, [0] * rows, device))

    return run


def load_model(config: EngineConfig, source: ModelSource | None = None) -> LoadedModel:
    """Build everything once. Raises ``JobError`` subclasses for a bad model path, an
    unsupported architecture, an unavailable device or backend, or a KV budget of no block."""
    device = config.torch_device  # raises DeviceUnavailableError before any loading
    source = source or resolve_model(config.model)
    cfg = read_model_config(source)
    tokenizer = Tokenizer(source.path)
    model = build_model(config, source, cfg)
    backend_name = "torch" if config.kernels == "torch" else config.attention_backend
    if device.type == "cuda" and config.kv_cache_memory is None:
        per_block = KVCache.bytes_per_block(
            cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, config.torch_dtype
        )
        largest = largest_step(model, config, cfg, backend_name)
        num_blocks = gpu_kv_blocks(largest, device, per_block, config.gpu_memory_utilization)
    else:
        num_blocks, _ = kv_pool_blocks(config, cfg)
    cache = KVCache(
        cfg.num_layers,
        num_blocks,
        config.block_size,
        cfg.num_kv_heads,
        cfg.head_dim,
        config.torch_dtype,
        device,
    )
    # Built here, not per job: on the CPU this may compile the decode kernel (once per machine).
    backend = select_backend(backend_name, cache, cfg.num_heads, cfg.head_dim**-0.5)
    limits = EngineLimits.of(config, cfg, num_blocks)
    graphs = decode_graphs(config, model, backend, -(-limits.max_model_len // config.block_size))
    eos = [*cfg.eos_token_ids, tokenizer.eos_token_id]
    return LoadedModel(
        config=config,
        source=source,
        model_config=cfg,
        tokenizer=tokenizer,
        model=model,
        cache=cache,
        backend=backend,
        limits=limits,
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        name=model_name(config.model),
        graphs=graphs,
    )


def decode_graphs(
    config: EngineConfig, model: DecoderModel, backend: AttentionBackend, max_blocks: int
) -> DecodeGraphRunner | None:
    """The decode-step graph runner when ``config.cuda_graphs`` and the backend has the graph
    hooks; captured here on CUDA (before any request holds a block). Elsewhere the same padded
    buffers run eagerly (how the tests check the hooks without a GPU)."""
    if not config.cuda_graphs or not isinstance(backend, GraphMetadataHooks):
        return None
    backend.set_graph_limits(max_blocks)  # type: ignore[attr-defined]

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: object) -> torch.Tensor:
        rows = torch.arange(ids.shape[0], device=ids.device)
        return model(ids, pos, backend, meta, rows)

    graphs = DecodeGraphRunner(forward, backend, config.max_cuda_graph_batch, config.torch_device)
    if graphs.use_graphs:
        graphs.capture()
    return graphs
