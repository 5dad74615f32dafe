"""The experts of a mixture-of-experts layer: every expert's SwiGLU MLP with its weights
stacked, ``gate_up_proj`` (E, 2 * I, H) (gate rows, then up rows) and ``down_proj``
(E, H, I), as transformers 5 stores them in memory and vLLM's ``FusedMoE`` does.

Checkpoints store one tensor per expert and projection (``experts.{e}.gate_proj.weight``, or
Mixtral's ``w1``/``w3``/``w2``) or, when saved by transformers 5 with
``save_original_format=False``, the stacked tensors; ``Experts.weight_loader`` takes both. How
the experts are computed is the ``ExpertsKernel`` the worker picks (``kernel_choice.py``):
the plain PyTorch reference here (tokens sorted by expert, one GEMM per active expert and
projection), the CPU fast path (``cpu_experts.py``) or the fused Triton kernel
(``triton_experts.py``); all are tested against the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers import silu_and_mul
from .routing import combine, sort_by_expert

# SiLU-and-mul: (N, 2 * I), gate then up -> (N, I)
Activation = Callable[[torch.Tensor], torch.Tensor]
# (out (N, O), rows (N, K) sorted by expert, weights (E, K, O), rows per expert (E,) int64):
# fills out with each expert's slice of rows times its weight
GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (experts, x (T, H), routing weights (T, top_k) fp32, expert ids (T, top_k) int64) -> (T, H)
ExpertsKernel = Callable[["Experts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# A checkpoint's per-expert projections: which stacked parameter, and which half of it.
PROJECTIONS = {"gate": ("gate_up_proj", 0), "up": ("gate_up_proj", 1), "down": ("down_proj", 0)}


def grouped_experts(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The reference kernel: ``grouped_gemms`` over the stacked weights as stored, one
    PyTorch GEMM per expert."""
    up, down = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    return grouped_gemms(x, weights, ids, up, down, silu_and_mul, gemm_per_expert)


def gemm_per_expert(
    out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
) -> None:
    """out (N, O) = each expert's slice of rows (N, K) times its weights[e] (E, K, O), the
    slices in expert order, counts (E,) rows each: one ``torch.mm`` per expert with rows (one
    read of the counts to the host). A ``GroupedGemm``."""
    ends = counts.cumsum(0).tolist()
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        if end > start:
            torch.mm(rows[start:end], weights[e], out=out[start:end])


def grouped_gemms(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Activation,
    gemm: GroupedGemm,
) -> torch.Tensor:
    """x (T, H) through the experts ``up`` (E, H, 2 * I) and ``down`` (E, I, H) (the stacked
    weights transposed, as views or copies) -> (T, H). The T * top_k (token, expert) rows are
    sorted by expert and gathered; ``gemm`` runs each expert's slice through its projection
    (one GEMM per expert with rows, or tiles of them), ``act`` (SiLU-and-mul, (N, 2I) ->
    (N, I)) runs once over all rows, and the rows are weighted and summed back into their
    tokens."""
    order, counts = sort_by_expert(ids, up.shape[0])
    rows = x.index_select(0, order // ids.shape[1])  # (N, H), grouped by expert
    gate_up = rows.new_empty(rows.shape[0], up.shape[2])
    gemm(gate_up, rows, up, counts)
    hidden = act(gate_up)  # (N, I)
    out = torch.empty_like(rows)
    gemm(out, hidden, down, counts)
    return combine(out, order, weights)


class Experts(nn.Module):
    """``num_experts`` SwiGLU MLPs of ``intermediate`` units over ``hidden`` (stacked weights,
    see the module's docstring). ``forward(x, weights, ids)``: x (T, H), each token's routing
    weights (T, top_k) and expert ids (T, top_k) -> sum over its experts of weight x MLP(x),
    (T, H) in x's dtype, computed by ``kernel``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.kernel: ExpertsKernel = grouped_experts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.kernel(self, x, weights, ids)

    @staticmethod
    def shard(expert: int, projection: str) -> tuple[str, int]:
        """The stacked parameter (``gate_up_proj`` or ``down_proj``) a checkpoint's
        per-expert tensor of ``projection`` (gate, up or down) loads into, and its shard
        there (for ``weight_loader``)."""
        param, half = PROJECTIONS[projection]
        return param, 2 * expert + half if param == "gate_up_proj" else expert

    def shards_of(self, param: str) -> set[int]:
        """Every shard of a stacked parameter (``gate_up_proj`` or ``down_proj``)."""
        per_expert = 2 if param == "gate_up_proj" else 1
        return set(range(per_expert * self.num_experts))

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        """Copy a checkpoint tensor into a stacked parameter: the whole of it (``shard`` None:
        a stacked checkpoint tensor) or one expert's projection (``shard`` from ``shard``:
        gate (I, H) or up (I, H) into ``gate_up_proj``, down (H, I) into ``down_proj``).
        Raises ValueError when the shapes differ."""
        rows = param.data
        if shard is not None and param is self.gate_up_proj:
            expert, half = divmod(shard, 2)
            rows = rows[expert, half * self.intermediate : (half + 1) * self.intermediate]
        elif shard is not None:
            rows = rows[shard]
        if rows.shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} where {tuple(rows.shape)} is expected")
        rows.copy_(tensor)
