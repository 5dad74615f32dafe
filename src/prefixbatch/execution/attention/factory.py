"""Pick the attention backend for a device."""

from __future__ import annotations

from ...config import ModelConfig
from .backend import AttentionBackend, KVCache
from .native import NativeDecodeBackend, paged_decode_kernel
from .shared_prefix import SharedPrefixBackend


def make_backend(cache: KVCache, cfg: ModelConfig, native: bool) -> AttentionBackend:
    """With ``native`` (a CPU fp32 cache), the compiled decode kernel; otherwise, or when it
    cannot be built, the PyTorch shared-prefix backend (the reference path on rows outside
    groups)."""
    scale = cfg.head_dim**-0.5
    kernel = paged_decode_kernel() if native else None
    if kernel is not None:
        return NativeDecodeBackend(cache, cfg.num_heads, scale, kernel)
    return SharedPrefixBackend(cache, cfg.num_heads, scale)
