"""Which kernel computes a model's mixture-of-experts layers (``Experts.kernel``): the
plain PyTorch reference (``experts.py``), the CPU fast path (``cpu_experts.py``) or the fused
Triton kernel (``triton_experts.py``, imported only when chosen: triton is optional on the
CPU). The worker picks the name; the modules below it never import this one.
"""

from __future__ import annotations

from torch import nn

from ..layers import silu_and_mul
from .cpu_experts import CpuExperts
from .experts import Activation, Experts, grouped_experts


def use_experts_kernel(model: nn.Module, kernel: str, act: Activation | None = None) -> None:
    """Compute every ``Experts`` of ``model`` with ``kernel``: ``torch`` (the reference),
    ``cpu`` (the CPU fast path, fp32, after loading: it repacks the weights, and runs ``act``,
    the fused SiLU-and-mul, where given) or ``triton`` (the fused kernel: CUDA, or the CPU
    under ``TRITON_INTERPRET=1``; needs triton). A model without experts is left as it is.
    Raises ValueError for another name."""
    if kernel not in ("torch", "cpu", "triton"):
        raise ValueError(f"unknown experts kernel {kernel!r}; use torch, cpu or triton")
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        if kernel == "torch":
            module.kernel = grouped_experts
        elif kernel == "cpu":
            module.kernel = CpuExperts(module, act or silu_and_mul)
        else:
            from .triton_experts import triton_experts

            module.kernel = triton_experts
