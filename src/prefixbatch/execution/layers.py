"""Building blocks shared by every model family: RMSNorm (and Gemma's (1 + w) variant), rotary
embedding, gated MLP (SwiGLU, or GeGLU for Gemma).

Plain PyTorch: the reference the fused CPU kernels (``fused_ops.py``, run by
``models/fused_forward.py``) are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import RopeConfig
from .packed_linear import Linear, MergedLinear

if TYPE_CHECKING:
    from .fused_ops import FusedKernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim) normalised over its last dimension in fp32, times weight (dim,)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x (..., dim) normalised in fp32 times (1 + weight), then cast back (the
    order of transformers' ``Gemma2RMSNorm``: the product in fp32, unlike Llama's)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, as the reference implementations do."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def kernel_weight(self) -> torch.Tensor:
        """(dim,) what the normalised x is multiplied by: the weight the fused CPU kernels
        take."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, dim) or (T, heads, dim) -> normalised."""
        return self.norm(x)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual (T, dim) -> (normalised sum, the sum): a residual add with the norm after
        it (the fused kernel does both in one pass)."""
        residual = x + residual
        return self.norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint's weight ``w`` scales by ``1 + w`` (``gemma_rms_norm``)."""

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(x, self.weight, self.eps)

    def kernel_weight(self) -> torch.Tensor:
        """(dim,) fp32: 1 + w (a new tensor)."""
        return 1.0 + self.weight.detach().float()


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """The rotated dimensions of each head: all of them, or ``partial_rotary_factor`` of them."""
    return int(head_dim * rope.partial_rotary_factor)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (rotary_dim / 2,), with linear, llama3 or LongRoPE scaling when
    configured (computed as transformers' ``_compute_linear_scaling_rope_parameters``,
    ``_compute_llama3_parameters`` and ``_compute_longrope_parameters`` do)."""
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.rope_type == "longrope":
        factors = rope.long_factor if rope.long_context else rope.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**exponents)
    inv = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type != "llama3":
        return inv
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate half") RoPE applied to flattened tokens."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)
        self.attention_factor = rope.attention_factor

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, rotary_dim/2) contiguous, times the attention factor,
        shared by every layer of a step."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        scale = self.attention_factor
        return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim) rotated by per-token cos, sin (T, rotary_dim/2) -> a new tensor:
    the first rotary_dim dimensions of each head rotate in halves, the rest pass through
    (partial rotary, as transformers' ``apply_rotary_pos_emb``)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2 * intermediate), gate then up -> silu(gate) * up (T, intermediate)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2 * intermediate), gate then up -> gelu(gate) * up (T, intermediate), gelu's
    tanh approximation (Hugging Face's ``gelu_pytorch_tanh``: Gemma's GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.gelu(gate, approximate="tanh") * up


class GatedMLP(nn.Module):
    """Gated feed-forward with gate and up projections fused into one matmul: SwiGLU, or another
    gate ``activation`` (``gelu_tanh_and_mul``: GeGLU)."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, (intermediate, intermediate), bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> (T, hidden)."""
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.activation(gate_up))

    def fused(self, kernels: FusedKernels) -> Callable[[torch.Tensor], torch.Tensor]:
        """This MLP on the CPU fast path (after packing): x (T, hidden), T >= 1 -> (T, hidden),
        the projections called directly with the activation's fused kernel between them (the
        kernel of the same name: ``silu_and_mul``, ``gelu_tanh_and_mul``)."""
        up, up_weight, up_bias = self.gate_up_proj.projection()
        down, down_weight, down_bias = self.down_proj.projection()
        act_mul = getattr(kernels, self.activation.__name__)

        def mlp(x: torch.Tensor) -> torch.Tensor:
            return down(act_mul(up(x, up_weight, up_bias)), down_weight, down_bias)

        return mlp
