"""The experts on the CPU fast path (fp32): the reference's grouped GEMMs
(``experts.grouped_gemms``) over weights repacked once so each expert's GEMM reads its weight
row-major, every expert's GEMM of a projection in one parallel region (``csrc/grouped_gemm.cpp``,
compiled on first use; the per-expert PyTorch loop where it cannot be built), and the fused
SiLU-and-mul kernel between the two projections.

The stacked weights are stored (E, out, in), the layout checkpoints use; a GEMM over a slice of
rows multiplies by each expert's transpose. Copying them once as (E, in, out) and dropping the
originals (the model is inference-only, as ``Linear.pack`` does) costs no memory at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..native_build import build_extension
from .experts import Activation, Experts, GroupedGemm, gemm_per_expert, grouped_gemms

SOURCE = Path(__file__).parent.parent / "csrc" / "grouped_gemm.cpp"


def native_grouped_gemm() -> GroupedGemm | None:
    """The compiled grouped GEMM (``grouped_mm_(out, rows, weights, counts)``), or None (the
    build failed: a warning says why)."""
    module = build_extension((SOURCE,), "the grouped GEMM of the CPU experts")
    return None if module is None else module.grouped_mm_


class CpuExperts:
    """An ``ExpertsKernel`` over ``experts``' weights, repacked when built (see the module)."""

    def __init__(self, experts: Experts, act: Activation) -> None:
        self.up = experts.gate_up_proj.detach().transpose(1, 2).contiguous()  # (E, H, 2I)
        self.down = experts.down_proj.detach().transpose(1, 2).contiguous()  # (E, I, H)
        self.act = act
        self.gemm: GroupedGemm = native_grouped_gemm() or gemm_per_expert
        for name in ("gate_up_proj", "down_proj"):
            empty = torch.nn.Parameter(self.up.new_empty(0), requires_grad=False)
            setattr(experts, name, empty)

    def __call__(
        self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """x (T, H), weights and ids (T, top_k) -> (T, H) (``ExpertsKernel``)."""
        return grouped_gemms(x, weights, ids, self.up, self.down, self.act, self.gemm)
