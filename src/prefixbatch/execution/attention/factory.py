"""Pick the attention backend for a device."""

from __future__ import annotations

from ...config import ModelConfig
from .backend import AttentionBackend, KVCache
from .shared_prefix import SharedPrefixBackend


def make_backend(cache: KVCache, cfg: ModelConfig) -> AttentionBackend:
    """The shared-prefix backend; on rows outside groups it is the reference path."""
    return SharedPrefixBackend(cache, cfg.num_heads, cfg.head_dim**-0.5)
