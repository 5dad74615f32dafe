"""Linear layers whose fp32 CPU weights are packed once for oneDNN.

``F.linear`` on the CPU goes to MKL, which on this project's AMD machines runs at under half of
what the cores can do; oneDNN with the weight pre-packed into its blocked layout ran every
projection of SmolLM2 2.1-2.9x faster (1 to 1024 rows). Results equal ``F.linear``'s up to fp32
summation order. The worker packs after loading weights; ``kernels="torch"`` keeps plain
``nn.Linear`` behaviour (the reference).

``MergedLinear`` computes several projections of one input as one matmul (q/k/v, gate/up); its
``weight_loader`` puts each checkpoint tensor into its rows (the ``weight_loader`` pattern of vLLM
and nano-vllm: the layer that owns a parameter knows how a checkpoint tensor maps into it, which is
also where a tensor-parallel shard would be cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# Row count oneDNN chooses the packed layout for; measured as good from 1 to 1024 rows.
_ROWS_HINT = 1024

# A projection as a plain call: function(x (T, in), weight, bias) -> (T, out).
Projection = tuple[
    Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    torch.Tensor,
    torch.Tensor | None,
]


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, in), T >= 1, times a weight packed by ``Linear.pack`` (plus bias) -> (T, out)."""
    return torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` that can switch to a packed copy of its weight (CPU, fp32)."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Pack the weight for oneDNN and drop the plain copy (the model is inference-only;
        a weight tied to an embedding stays with the embedding)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _ROWS_HINT)
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return super().forward(x)
        if x.shape[0] == 0:  # a step that samples nothing
            return x.new_empty(0, self.out_features)
        return packed_linear(x, self.packed, self.bias)

    def projection(self) -> Projection:
        """This layer as a plain call (no module call), for inputs of at least one row."""
        if self.packed is None:
            return nn.functional.linear, self.weight, self.bias
        return packed_linear, self.packed, self.bias


class MergedLinear(Linear):
    """Projections of one input stacked into one weight: output rows ``[0, sizes[0])`` are the
    first projection, the next ``sizes[1]`` rows the second, and so on."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        """Copy a checkpoint tensor into ``param`` (this layer's weight or bias): projection
        ``shard``'s rows, or the whole parameter for ``shard=None`` (a checkpoint that stores
        the merged projection). Raises ValueError when the shapes differ."""
        rows = param.data
        if shard is not None:
            start = sum(self.output_sizes[:shard])
            rows = rows[start : start + self.output_sizes[shard]]
        if rows.shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} where {tuple(rows.shape)} is expected")
        rows.copy_(tensor)


def pack_linears(module: nn.Module) -> None:
    """Pack every ``Linear`` under ``module`` for oneDNN (CPU, fp32; after loading)."""
    for layer in module.modules():
        if isinstance(layer, Linear):
            layer.pack()
