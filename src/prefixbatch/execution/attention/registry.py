"""Attention backends by name, chosen by device, dtype and what this machine can run.

``select_backend("auto", ...)`` takes the first registered backend that supports the device and
dtype, in priority order; a name picks that backend (an error if it cannot run here). The plain
PyTorch ``torch`` backend runs everywhere and is the reference the others are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import JobError
from ..kv_cache import KVCache
from .backend import AttentionBackend

Factory = Callable[[KVCache, int, float], AttentionBackend | None]


@dataclass(frozen=True)
class BackendEntry:
    """``supports(device, dtype)`` says whether the backend can run; ``build`` may still return
    None when a compiled part cannot be built (a warning says why), and the next entry is used."""

    name: str
    supports: Callable[[torch.device, torch.dtype], bool]
    build: Factory


class BackendUnavailableError(JobError):
    """A backend asked for by name cannot run on this device, dtype or machine."""


def _cpu_native(cache: KVCache, heads: int, scale: float) -> AttentionBackend | None:
    from .native import NativeDecodeBackend, paged_decode_kernel

    kernel = paged_decode_kernel()
    return None if kernel is None else NativeDecodeBackend(cache, heads, scale, kernel)


def _torch(cache: KVCache, heads: int, scale: float) -> AttentionBackend:
    from .shared_prefix import SharedPrefixBackend

    return SharedPrefixBackend(cache, heads, scale)


def _is_cpu_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32


# Highest priority first; "torch" last: it runs everywhere.
BACKENDS: list[BackendEntry] = [
    BackendEntry("cpu", _is_cpu_fp32, _cpu_native),
    BackendEntry("torch", lambda device, dtype: True, _torch),
]


def backend_names() -> list[str]:
    return [e.name for e in BACKENDS]


def select_backend(name: str, cache: KVCache, num_heads: int, scale: float) -> AttentionBackend:
    """The backend ``name`` (or the best available for ``"auto"``) over ``cache``.

    Raises ``BackendUnavailableError`` for an unknown name or one that cannot run here.
    """
    device, dtype = cache.k.device, cache.k.dtype
    if name != "auto":
        entry = next((e for e in BACKENDS if e.name == name), None)
        if entry is None:
            raise BackendUnavailableError(
                f"unknown attention backend {name!r}; use auto, {', '.join(backend_names())}"
            )
        backend = entry.build(cache, num_heads, scale) if entry.supports(device, dtype) else None
        if backend is None:
            raise BackendUnavailableError(
                f"attention backend {name!r} cannot run on {device.type} with {dtype}"
            )
        return backend
    for entry in BACKENDS:
        if entry.supports(device, dtype):
            backend = entry.build(cache, num_heads, scale)
            if backend is not None:
                return backend
    raise AssertionError("the torch backend supports every device")
