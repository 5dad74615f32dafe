"""Fused element-wise CPU kernels of a decoder layer (``csrc/elementwise.cpp``), compiled on
first use like vLLM's CPU ``_C`` ops.

Eager PyTorch runs a layer's norms, residual adds, rope and SiLU-and-mul as a dozen small ops,
each a pass over memory and a dispatch; the kernels do each in one pass, in place where they can
(rope rotates q and k inside the fused qkv output). SiLU- and GELU-and-mul gate the MLP of the
Llama-style families and of Gemma. fp32 only; the engine switches them on with
the other CPU fast paths (``kernels="auto"``, CPU, fp32). The plain PyTorch path in ``layers.py``
is the reference they are tested against; without a C++ compiler the engine keeps it. The same
module holds the greedy sampler's row argmax (torch's CPU argmax is a scalar loop: about 4 ms
for 96 rows of a 49k vocabulary, a few percent of a decode step) and, for steps whose every row
is greedy, the output projection fused with that argmax (``csrc/lm_head_argmax.cpp``: the logits
are never written; 67 ms against 153 for ``torch.mm`` and the argmax at 1,024 rows x 128 hidden
x 49,152 vocabulary on two AVX2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .native_build import build_extension

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "elementwise.cpp", CSRC / "lm_head_argmax.cpp")


class FusedKernels(Protocol):
    """The compiled module's functions (all tensors fp32, last dimension contiguous)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (T, D) or (T, H, D), any row strides -> RMSNorm(x) * weight, contiguous."""
        ...

    def rms_norm_(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        """x (T, D) or (T, H, D), any row strides, normalised in place."""
        ...

    def fused_add_rms_norm_(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> None:
        """x, residual (T, D) contiguous: residual += x, then x = RMSNorm(residual) * weight."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2I) contiguous -> silu(gate) * up (T, I)."""
        ...

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2I) contiguous -> gelu(gate) * up (T, I), gelu's tanh approximation
        (Gemma's GeGLU)."""
        ...

    def rotary_embedding_(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """q (T, H, D), k (T, KVH, D), any token and head strides, rotated in place by
        cos, sin (T, D/2) contiguous (rotate-half RoPE)."""
        ...

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, V) contiguous -> (S,) int64, the first index of each row's maximum (the greedy
        sampler's ``argmax``; rows must not hold NaN)."""
        ...

    def lm_head_argmax(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (S, K), rows contiguous, and weight (V, K) contiguous -> (S,) int64: the first
        index of each row's largest logit ``x @ weight.T``, the logits never materialised. The
        sums run in another order than ``torch.mm``'s: where a row's two largest logits are
        within rounding of each other either may be picked. Rows must not hold NaN."""
        ...


def fused_kernels() -> FusedKernels | None:
    """The compiled kernels, or None (the build failed: a warning says why)."""
    return build_extension(SOURCES, "the fused CPU element-wise kernels")  # type: ignore[return-value]
