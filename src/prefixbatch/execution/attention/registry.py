"""Attention backends by name, chosen by device, dtype and what this machine can run.

``select_backend("auto", ...)`` takes the first registered backend that supports the device and
dtype, in priority order; a name picks that backend (an error if it cannot run here). The plain
PyTorch ``torch`` backend runs everywhere and is the reference the others are tested against.
Each backend's ``supports`` includes the cache's head sizes and layout (a value kept in the
key: multi-head latent attention, ``KVCache.value_in_key``).
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
    """``unsupported(cache)`` says why the backend cannot run over that cache (device, dtype,
    head size), or None when it can; ``build`` may still return None when a compiled part
    cannot be built (a warning says why), and the next entry is used."""

    name: str
    unsupported: Callable[[KVCache], str | None]
    build: Factory
    # Whether "auto" may pick it where it is supported (the Triton interpreter on the CPU is for
    # tests only: it must be asked for by name).
    in_auto: Callable[[torch.device], bool] = lambda device: True


class BackendUnavailableError(JobError):
    """A backend asked for by name cannot run on this device, dtype or machine."""


def _cpu_native(cache: KVCache, heads: int, scale: float) -> AttentionBackend | None:
    from .native import CpuBackend, decode_kernels

    kernels = decode_kernels()
    return None if kernels is None else CpuBackend(cache, heads, scale, kernels)


def _triton(cache: KVCache, heads: int, scale: float) -> AttentionBackend:
    from .triton_backend import TritonBackend

    return TritonBackend(cache, heads, scale)


def _triton_unsupported(cache: KVCache) -> str | None:
    """Where triton runs, head sizes the kernels take (``triton_launch.head_layout``; a narrower
    value only kept in the key)."""
    from .triton_backend import triton_available

    if not triton_available(cache.k.device):
        return (
            f"Triton does not run on {cache.k.device.type} here (CUDA, or the CPU under "
            "TRITON_INTERPRET=1 for tests, with the triton package installed)"
        )
    from .triton_launch import head_layout  # imports triton

    if cache.v.shape != cache.k.shape and not cache.value_in_key:
        return "its kernels take values of another size than the keys only kept in the key"
    layout = head_layout(cache.k.shape[-1], cache.v.shape[-1])
    return None if layout is None else f"its kernels cannot take {layout}"


def _torch(cache: KVCache, heads: int, scale: float) -> AttentionBackend:
    from .shared_prefix import SharedPrefixBackend

    return SharedPrefixBackend(cache, heads, scale)


def _cpu_unsupported(cache: KVCache) -> str | None:
    """fp32 on the CPU; a narrower value only kept in the key (the kernels' write is K and V of
    one size)."""
    if cache.k.device.type != "cpu" or cache.k.dtype != torch.float32:
        return "its kernels run on the CPU in float32 only"
    if cache.v.shape != cache.k.shape and not cache.value_in_key:
        return "its kernels take values of another size than the keys only kept in the key"
    return None


# Highest priority first; "torch" last: it runs everywhere.
BACKENDS: list[BackendEntry] = [
    BackendEntry("triton", _triton_unsupported, _triton, in_auto=lambda d: d.type == "cuda"),
    BackendEntry("cpu", _cpu_unsupported, _cpu_native),
    BackendEntry("torch", lambda cache: None, _torch),
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
        why = entry.unsupported(cache)
        backend = entry.build(cache, num_heads, scale) if why is None else None
        if backend is None:
            latent = ", kept in the key" if cache.value_in_key else ""
            raise BackendUnavailableError(
                f"attention backend {name!r} cannot run on {device.type} with {dtype} and "
                f"keys of {cache.k.shape[-1]} lanes, values of {cache.v.shape[-1]}{latent}: "
                + (why or "its compiled kernels could not be built (see the warning above)")
            )
        return backend
    for entry in BACKENDS:
        if entry.in_auto(device) and entry.unsupported(cache) is None:
            backend = entry.build(cache, num_heads, scale)
            if backend is not None:
                return backend
    raise AssertionError("the torch backend supports every device")
