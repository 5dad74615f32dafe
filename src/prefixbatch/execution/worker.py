"""The execution side's owner of one device: the model's weights, the KV cache, the attention
backend, the decode CUDA graphs and the fast-path choices, all settled once at start.

``Worker(config, model_config, weights)`` settles the rotary embedding for the engine's context
(LongRoPE's factor set, ``RopeConfig.at_context``), builds the checkpoint's family model in the
target dtype on the device and loads the weights (``models/loader.py``); on the CPU in fp32 it
packs the projections for oneDNN and builds the fused kernels (the family's fast forward, the
compiled greedy argmax and the greedy head that fuses the lm_head with it); it picks how a
mixture-of-experts model computes its experts (``moe/kernel_choice.py``); it sizes the KV pool (a
byte budget, or on CUDA a profiling forward at the largest step, ``kv_memory.py``), allocates it,
picks the attention backend (``attention/registry.py``) and captures the decode graphs
(``cuda_graphs.py``). Engines get a ``ModelRunner``, the argmax and the greedy head from it and
never reach into the model. One worker may serve several engines (the same weights under
different policies), one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from ..config import EngineConfig, ModelConfig
from ..sampling_params import SamplingParams
from .attention.backend import AttentionBackend
from .attention.native import decode_kernels
from .attention.registry import select_backend
from .attention.step import AttentionStep, SeqStep
from .cuda_graphs import DecodeGraphRunner, GraphMetadataHooks
from .fused_ops import FusedKernels, fused_kernels
from .host_memory import keep_freed_memory
from .kv_cache import KVCache
from .kv_memory import gpu_kv_blocks, kv_pool_blocks
from .model_runner import ModelRunner
from .models.family import Forward
from .models.loader import Weights, build_model
from .models.registry import family_named
from .moe.kernel_choice import use_experts_kernel
from .packed_linear import onednn_available, pack_linears
from .sampler import SamplingTensors, sample, torch_argmax
from .score_head import ScoreHead


class Worker:
    """One model on one device, ready to run steps.

    ``forward`` is what steps run: the CPU fast path's forward (``fused_forward.py``) where it
    applies, else the model's own (the plain PyTorch reference). ``argmax`` is the greedy
    sampler's row argmax (the compiled one with the CPU fast paths). ``greedy_head`` maps a
    greedy step's final-norm hidden states (S, hidden) to its tokens (S,) int64 in one pass
    over the lm_head weight (``fused_ops.lm_head_argmax``), with the CPU fast paths when the
    family's logits are its plain output projection; else None. ``graphs`` replays decode
    steps (None when off or the backend has no graph hooks).

    Raises ``JobError`` subclasses: a checkpoint that does not fit the model, an attention
    backend that cannot run here, a KV budget of no block.
    """

    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: Weights) -> None:
        self.config = config
        # the rope as this engine's context runs it (LongRoPE: one factor set for every sequence)
        rope = model_config.rope.at_context(config.context_len(model_config))
        self.model_config = model_config = replace(model_config, rope=rope)
        self.device = config.torch_device
        family = family_named(model_config.architecture)
        self.model = build_model(family, model_config, weights, self.device, config.torch_dtype)
        kernels = self._cpu_fast_paths()
        act = None if kernels is None else kernels.silu_and_mul
        use_experts_kernel(self.model, self._experts_kernel(kernels is not None), act)
        self.forward: Forward = self.model
        if kernels is not None and family.fast_forward is not None:
            self.forward = family.fast_forward(self.model, kernels)
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = (
            torch_argmax if kernels is None else kernels.argmax_rows
        )
        backend_name = "torch" if config.kernels == "torch" else config.attention_backend
        self.num_blocks = self._kv_blocks(backend_name)
        self.cache = self._cache(self.num_blocks)
        # Built here, not per job: on the CPU this may compile the decode kernel (once per machine).
        self.backend = self._backend(backend_name, self.cache)
        self.graphs = self._decode_graphs()
        # Decode graphs replay the logits path (on the CPU only in tests): no greedy head then.
        self.greedy_head = (
            None if kernels is None or self.graphs is not None else self._greedy_head(kernels)
        )

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV pool (K and V; V once where it is part of K)."""
        return self.cache.nbytes

    def runner(self, share_prefix_attention: bool, min_shared: int | None) -> ModelRunner:
        """A runner of steps on this worker's model, backend and graphs (its options as
        ``ModelRunner`` documents them)."""
        return ModelRunner(
            self.forward,
            self.backend,
            self.config.block_size,
            self.device,
            share_prefix_attention=share_prefix_attention,
            min_shared=min_shared,
            graphs=self.graphs,
        )

    def score_head(self, tokens: tuple[int, int] | None) -> ScoreHead | None:
        """The model's score head (``score_head.py``): the logits of the token ids ``tokens``
        (false, true) when given, else a classifier checkpoint's ``score`` matrix; None for a
        causal LM without ``tokens``."""
        if tokens is not None:
            return ScoreHead.tokens(self.model.logits, self.config.torch_dtype, *tokens)
        if self.model.score is not None:
            return ScoreHead.classifier(self.model.score.weight)
        return None

    def _cpu_fast_paths(self) -> FusedKernels | None:
        """The fused CPU kernels when the fast paths apply (``kernels="auto"`` on the CPU in
        fp32), after keeping freed host memory and packing the projections for oneDNN; None
        elsewhere or when the kernels cannot be built (a warning says why). Where the CPU
        attention backend may be chosen, its kernels are built at the same time on another
        thread (a machine's first start compiles both modules at once: 25-28 s on 2 idle
        cores, about 60 one after the other); the backend then finds them built. (A model the
        CPU backend cannot take, values of another size than the keys, builds it for
        nothing, once per machine.)"""
        config = self.config
        cpu_fp32 = self.device.type == "cpu" and config.torch_dtype == torch.float32
        if config.kernels != "auto" or not cpu_fp32:
            return None
        keep_freed_memory()
        if onednn_available():
            pack_linears(self.model)
        with ThreadPoolExecutor(1) as builds:  # leaving the block waits for the other build
            if config.attention_backend in ("auto", "cpu"):
                builds.submit(decode_kernels)
            return fused_kernels()

    def _greedy_head(self, kernels: FusedKernels) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The lm_head fused with the argmax, where the model's logits are its plain output
        projection with a contiguous fp32 weight."""
        head = self.model.greedy_projection()
        if head is None or head.bias is not None:
            return None
        weight = head.weight  # tied to the embeddings or not, as loaded
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            return None
        return lambda hidden: kernels.lm_head_argmax(hidden, weight)

    def _experts_kernel(self, cpu_fast: bool) -> str:
        """How a mixture-of-experts model computes its experts (``moe/kernel_choice.py``): the fused
        Triton kernel on CUDA (and on the CPU when the Triton attention backend is asked for:
        the interpreter), the CPU fast path with the other CPU fast paths, else the reference."""
        from .attention.triton_backend import triton_available

        config = self.config
        if config.kernels != "auto":
            return "torch"
        on_cuda = self.device.type == "cuda"
        if (on_cuda or config.attention_backend == "triton") and triton_available(self.device):
            return "triton"
        return "cpu" if cpu_fast else "torch"

    def _cache(self, num_blocks: int) -> KVCache:
        cfg, config = self.model_config, self.config
        return KVCache.of_layout(
            cfg.num_layers, num_blocks, config.block_size, cfg.kv_layout, config.torch_dtype,
            self.device,
        )  # fmt: skip

    def _backend(self, name: str, cache: KVCache) -> AttentionBackend:
        cfg = self.model_config
        return select_backend(name, cache, cfg.num_heads, cfg.attention_scale)

    def _kv_blocks(self, backend_name: str) -> int:
        """Blocks of the KV pool: ``kv_cache_memory`` (or the CPU default) as a byte budget;
        on CUDA without one, what a profiling forward at the largest step leaves."""
        config, cfg = self.config, self.model_config
        if self.device.type != "cuda" or config.kv_cache_memory is not None:
            return kv_pool_blocks(config, cfg)[0]
        per_block = KVCache.bytes_per_block(
            cfg.num_layers, config.block_size, cfg.kv_layout, config.torch_dtype
        )
        return gpu_kv_blocks(
            lambda: self._largest_step(backend_name),
            self.device,
            per_block,
            config.gpu_memory_utilization,
        )

    def _largest_step(self, backend_name: str) -> torch.Tensor:
        """One forward of the largest step the scheduler makes (``max_num_batched_tokens``
        prefill tokens) sampling ``max_num_seqs`` rows, through a throwaway cache just big
        enough: run before the KV pool exists, it shows the weights' and activations' peak."""
        tokens, bs = self.config.max_num_batched_tokens, self.config.block_size
        blocks = -(-tokens // bs)
        backend = self._backend(backend_name, self._cache(blocks))
        step = AttentionStep.of([SeqStep(0, tokens, tokens, tuple(range(blocks)))], block_size=bs)
        rows = min(tokens, self.config.max_num_seqs)
        device = self.device
        logits = self.forward(
            torch.zeros(tokens, dtype=torch.long, device=device),
            torch.arange(tokens, device=device),
            backend,
            backend.prepare(step),
            torch.arange(tokens - rows, tokens, device=device),
        )
        params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9)] * rows
        return sample(logits, SamplingTensors.build(params, [0] * rows, [0] * rows, device))

    def _decode_graphs(self) -> DecodeGraphRunner | None:
        """The decode-step graph runner when ``cuda_graphs`` is on and the backend has the
        graph hooks; captured here on CUDA (before any request holds a block). Elsewhere the
        same padded buffers run eagerly (how the tests check the hooks without a GPU)."""
        config, backend = self.config, self.backend
        if not config.cuda_graphs or not isinstance(backend, GraphMetadataHooks):
            return None
        max_blocks = -(-config.context_len(self.model_config) // config.block_size)
        backend.set_graph_limits(max_blocks)  # type: ignore[attr-defined]
        forward = self.forward

        def decode(ids: torch.Tensor, pos: torch.Tensor, meta: object) -> torch.Tensor:
            rows = torch.arange(ids.shape[0], device=ids.device)
            return forward(ids, pos, backend, meta, rows)

        graphs = DecodeGraphRunner(decode, backend, config.max_cuda_graph_batch, self.device)
        if graphs.use_graphs:
            graphs.capture()
        return graphs
