"""The Triton attention backend: paged KV writes and shared-prefix attention in three launches
per layer (KV store, prefix levels, own KV merged with the levels), for any mixed step.

It builds its metadata once per step (``prepare``) and reuses it for every layer (``forward``).
This module imports without triton installed, so ``triton_available`` can be asked anywhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..kv_cache import KVCache
from .backend import AttentionBackend
from .step import AttentionStep
from .triton_metadata import MetadataShape, TritonMetadata


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton importable, or the
    CPU with ``TRITON_INTERPRET=1`` set before triton was imported (the tests' interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(AttentionBackend):
    """Writes a step's new K/V into the paged cache and computes attention for every row, the
    rows below prefix levels reading each level once per tile of rows (see ``triton_kernels``).

    ``forward`` gets q (T, H, D), k and v (T, KVH, D) for the flattened step and returns
    (T, H, D) in q's dtype: an exact softmax over each row's whole context (levels, then its own
    positions ``[shared_len, context_len)`` causally), accumulated in fp32.
    """

    shares_prefix = True  # the runner may describe prefix-group members as levels + own KV

    def __init__(self, cache: KVCache, num_heads: int, scale: float) -> None:
        # Imported here so that this module, and triton_available, load without triton.
        from . import triton_kernels

        super().__init__(cache, num_heads, scale)
        self._kernels = triton_kernels
        self.group_size = num_heads // cache.k.shape[2]  # query heads per KV head

    def prepare(self, step: AttentionStep, shape: MetadataShape | None = None) -> TritonMetadata:
        """The step's metadata, on the cache's device (one host-to-device copy); padded to
        ``shape`` for a CUDA-graph bucket (see ``TritonMetadata.build``)."""
        return TritonMetadata.build(step, self.cache.k.device, self.group_size, shape)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: TritonMetadata,
    ) -> torch.Tensor:
        """Attention of layer ``layer`` for the step ``metadata`` was prepared for."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        self._kernels.write_kv(k, v, k_pool, v_pool, metadata.slot_mapping)
        return self._kernels.triton_attention(q, k_pool, v_pool, metadata, self.scale)
