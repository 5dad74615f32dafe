"""Linear layers whose fp32 CPU weights are packed once for oneDNN.

``F.linear`` on the CPU goes to MKL, which on this project's AMD machines runs at under half of
what the cores can do; oneDNN with the weight pre-packed into its blocked layout ran every
projection of SmolLM2 2.1-2.9x faster (1 to 1024 rows). Results equal ``F.linear``'s up to fp32
summation order. The engine packs after loading weights; ``kernels="torch"`` keeps plain
``nn.Linear`` behaviour (the reference).
"""

from __future__ import annotations

import torch
from torch import nn

# Row count oneDNN chooses the packed layout for; measured as good from 1 to 1024 rows.
_ROWS_HINT = 1024


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


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
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
