"""Engine and model configuration: frozen, normalised once, read everywhere.

``ModelConfig`` is what the model code reads of a checkpoint's config; ``loading/model_config.py``
normalises a Hugging Face config into it (and each family adds its own fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .errors import ConfigError, DeviceUnavailableError
from .policy import Policy


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` is ``default``, ``linear``: positions divided
    by ``factor`` (Gemma 3's global layers), ``llama3``, ``longrope`` or ``yarn``).

    ``partial_rotary_factor``: the share of each head that is rotated (its first
    ``int(head_dim * factor)`` dimensions; Phi-4-mini: 0.75). ``attention_factor`` scales cos
    and sin (so q.k by its square; LongRoPE's sqrt(1 + ln(s) / ln(original)), as transformers
    computes it). LongRoPE (Ding et al., 2024; Phi-3) divides each inverse frequency by its
    ``short_factor`` for contexts up to ``original_max_position`` and by its ``long_factor``
    beyond; ``long_context`` says which set this engine runs (``at_context``). YaRN (Peng et
    al., 2023; gpt-oss) blends interpolated (divided by ``factor``) and original frequencies
    along a ramp between the dimensions that turn ``beta_fast`` and ``beta_slow`` times over
    ``original_max_position`` (rounded outwards when ``truncate``), and scales cos and sin by
    ``attention_factor``.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    partial_rotary_factor: float = 1.0
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    long_context: bool = False
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def at_context(self, context_len: int) -> RopeConfig:
        """The rope an engine of sequences of up to ``context_len`` positions runs: LongRoPE's
        long factors for every sequence when ``context_len`` exceeds ``original_max_position``,
        else its short ones (vLLM's choice). One set for all keeps every cached key, and every
        shared prefix, valid for every sequence; transformers instead switches a sequence to
        the long factors once it passes ``original_max_position`` and recomputes its cache."""
        if self.rope_type != "longrope":
            return self
        return replace(self, long_context=context_len > self.original_max_position)


@dataclass(frozen=True)
class KVLayout:
    """What the KV cache holds per token and layer: ``kv_heads`` heads of a key of ``head_dim``
    lanes and a value of ``value_dim`` lanes. ``value_in_key``: the value is the key's first
    ``value_dim`` lanes and is stored once, in the key (multi-head latent attention, DeepSeek-V2
    (DeepSeek-AI, 2024): one head whose key is the normalised latent ``c_kv`` followed by the
    roped ``k_pe`` and whose value is ``c_kv``)."""

    kv_heads: int
    head_dim: int
    value_dim: int
    value_in_key: bool = False

    def bytes_per_token(self, layers: int, dtype: torch.dtype) -> int:
        """Bytes one token takes in the cache over ``layers`` layers."""
        lanes = self.head_dim + (0 if self.value_in_key else self.value_dim)
        return layers * self.kv_heads * lanes * dtype.itemsize


@dataclass(frozen=True)
class ModelConfig:
    """A Hugging Face config normalised into the fields every family's model code reads
    (``architecture`` is the family's name); a family may extend it with fields of its own
    (``execution/models/family.py``)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool  # Hugging Face's ``attention_bias``; what it biases is the family's
    eos_token_ids: tuple[int, ...]
    # labels of a sequence classifier's score head (``*ForSequenceClassification``: the
    # ``score`` matrix on the last token's final hidden state); 0 for a causal LM
    num_labels: int = 0

    @property
    def attention_scale(self) -> float:
        """The factor on q . k before the softmax: 1 / sqrt(head_dim), unless the family's
        config sets another (Gemma's ``query_pre_attn_scalar``)."""
        return self.head_dim**-0.5

    @property
    def kv_layout(self) -> KVLayout:
        """What the KV cache stores per token: K and V of ``num_kv_heads`` heads of
        ``head_dim``, unless the family stores another layout (MLA's latent)."""
        return KVLayout(self.num_kv_heads, self.head_dim, self.head_dim)


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | int) -> int:
    """Parse ``512MiB``, ``2GiB``, ``1.5G`` or a byte count into bytes. Raises
    ``ConfigError`` (a ValueError) naming the forms it takes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ConfigError(
            f"{text!r} is not a memory size: give a number of bytes (e.g. 268435456) or one "
            "with a unit, e.g. 512MiB, 2GiB or 1.5G (K, M, G, T; KiB = KB = K = 1024 bytes)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from; the CLI and the Python API both produce one.

    ``kv_cache_memory`` is bytes for the KV pool (None: ``kv_cache_fraction`` of free memory).
    ``max_num_batched_tokens`` caps the prefill tokens of one step (chunked prefill);
    ``max_num_seqs`` caps running requests under the fcfs policies; batchllm is bounded by KV
    memory alone (memory-centric token batching).
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.3  # CPU: share of available memory (capped at 4 GiB)
    # CUDA: share of the device's memory the engine may use; the KV pool gets what is left after
    # the weights and a profiling forward at the largest step (as vLLM's option of that name).
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 256
    max_model_len: int | None = None
    policy: Policy = Policy.BATCHLLM
    seed: int = 0
    # Shared-prefix attention is used for sequences whose shared prefix has at least this many
    # tokens. None: the attention backend's own threshold (``min_shared_prefix``: 256 for the
    # PyTorch and Triton cascades, where a shorter prefix is cheaper to read through the plain
    # path than to merge; 128 for the CPU kernels).
    cascade_min_prefix: int | None = None
    # "auto": the fast paths where they apply (on the CPU in fp32: the compiled decode-attention
    # kernel, oneDNN-packed projections, the fused element-wise kernels and the compiled greedy
    # argmax); "torch": plain PyTorch only (the reference paths).
    kernels: str = "auto"
    # The attention backend by registry name ("auto": the best available for the device and
    # dtype; see execution/attention/registry.py).
    attention_backend: str = "auto"
    # Decode steps of up to max_cuda_graph_batch rows replay CUDA graphs, when the backend has
    # the graph hooks (Triton); captured once at load, per batch-size bucket.
    cuda_graphs: bool = True
    max_cuda_graph_batch: int = 256
    # Overlap scheduling: the host schedules and prepares step N+1 while the device runs step N
    # (the tokens N+1 needs from N are read on the device). None: on CUDA only; on the CPU the
    # host and the "device" are the same cores, so nothing would overlap.
    overlap_schedule: bool | None = None
    # A causal LM reranker's score tokens (false, true), e.g. ("no", "yes") for Qwen3-Reranker:
    # a score is p(true), the softmax over the two tokens' logits at the pair's last position
    # (vLLM's ``classifier_from_token`` with ``from_2_way_softmax``). None: a classifier
    # checkpoint scores with its ``score`` head, a causal LM does not score.
    score_tokens: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if self.score_tokens is not None:
            tokens = tuple(self.score_tokens)
            if len(tokens) != 2 or not all(isinstance(t, str) and t for t in tokens):
                raise ConfigError(
                    f"score_tokens must be two tokens (false, true), got {self.score_tokens!r}"
                )
            object.__setattr__(self, "score_tokens", tokens)
        if self.kernels not in ("auto", "torch"):
            raise ConfigError(f"unknown kernels {self.kernels!r}; use auto or torch")
        if self.block_size < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("block_size and max_num_batched_tokens must be positive")

    def context_len(self, model: ModelConfig) -> int:
        """The longest sequence (prompt and output) the engine runs: ``max_model_len`` capped
        by the model's positions."""
        return min(self.max_model_len or model.max_position, model.max_position)

    @property
    def torch_device(self) -> torch.device:
        """The device; raises ``DeviceUnavailableError`` for CUDA on a machine without it."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise DeviceUnavailableError(f"unknown device {self.device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {self.device}: CUDA is not available on this machine"
            )
        if device.type not in ("cpu", "cuda"):
            raise DeviceUnavailableError(f"--device {self.device}: use cpu, cuda or auto")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            # fp32 is the fast dtype on AVX2 CPUs; bf16 on GPUs.
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.dtype
        ]
