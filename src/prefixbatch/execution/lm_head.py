"""The output projection (lm_head): final hidden states -> vocabulary logits, its large outputs
written into one buffer that is reused from step to step on the CPU.

A decode step of 1,024 rows over SmolLM2's 49,152-token vocabulary makes 200 MB of fp32 logits.
Above glibc's largest mmap threshold (32 MiB, ``host_memory.py``) every tensor that size is a
fresh mapping: the GEMM faults it in page by page, zeroed by the kernel, and freeing it hands it
back. Measured on the project's 2-core Xeon: (1,024 x 128) @ (128 x 49,152) took 110 ms into a
fresh tensor and 57 ms into a reused one (oneDNN's packed call, which has no output argument:
108 ms), and a 1,024-request job of a 2-layer model (``bench/host_bound.py``) spent 12.6 of its
21.7 s in the lm_head, 7.2 s with the reused buffer. Outputs up to the threshold keep the packed
oneDNN call (``packed_linear.py``), faster at a few rows (16 x 2,048 -> 49,152: 27 ms against
52) and served from heap memory malloc already reuses.
"""

from __future__ import annotations

import torch

from .host_memory import MMAP_THRESHOLD
from .packed_linear import Linear


class LMHead(Linear):
    """``Linear(hidden, vocab)`` without bias. On the CPU, an output larger than
    ``MMAP_THRESHOLD`` bytes is computed with ``torch.mm`` into a buffer kept for the next call
    (grown to the largest output asked for, by at least a quarter at a time, never shrunk): **the logits a call returns are
    valid until the next call**, which suits the engine (a step's logits are consumed within
    the step: sampling, log-probabilities and prompt scores copy what they keep). Packing
    (``pack``) keeps the plain weight beside the packed copy, for those outputs: an lm_head not
    tied to the embeddings then holds its weight twice (vocab x hidden x 4 bytes more)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
        self._buffer = torch.empty(0)

    def pack(self) -> None:
        weight = self.weight
        super().pack()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, vocab = x.shape[0], self.out_features
        if x.device.type != "cpu" or rows * vocab * x.element_size() <= MMAP_THRESHOLD:
            return super().forward(x)
        size = self._buffer.numel()
        if size < rows * vocab or self._buffer.dtype != x.dtype:
            self._buffer = torch.empty(max(rows * vocab, size + size // 4), dtype=x.dtype)
        out = self._buffer[: rows * vocab].view(rows, vocab)
        return torch.mm(x, self.weight.t(), out=out)
