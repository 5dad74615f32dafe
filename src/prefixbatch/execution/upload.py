"""A step's host arrays on the device in one transfer.

Everything a step needs on the device (token ids, positions, the attention backend's metadata,
the sampler's per-row parameters) is built on the host as numpy arrays and travels together: on
CUDA through ONE pinned host buffer and ONE non-blocking copy (nano-vllm's ``prepare_decode``
pins and copies the same way; a copy from pageable memory would wait for the work already queued
on the stream, so the host could not prepare a step while the device runs the previous one).
On the CPU the arrays are used in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

M = TypeVar("M")


@dataclass(frozen=True)
class Staged(Generic[M]):
    """A step's metadata in two halves: the host ``arrays`` it needs on the device, and
    ``build``, which makes the metadata from their device copies (same keys). The model runner
    uploads the arrays of the step's inputs, metadata and sampling together (``upload``)."""

    arrays: dict[str, np.ndarray]
    build: Callable[[dict[str, torch.Tensor]], M]


def upload(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Host arrays as tensors on ``device`` with their dtypes and shapes. On the CPU they are
    the arrays themselves (no copy). Elsewhere they are packed into ONE pinned host buffer
    (8-byte aligned, from torch's caching host allocator, which keeps a buffer until its copy
    has run) and copied with one non-blocking transfer; the tensors are views of the copy."""
    if device.type == "cpu":
        return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    offsets, total = {}, 0
    for key, a in arrays.items():
        offsets[key] = total
        total += -(-a.nbytes // 8) * 8
    host = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=True)
    staging = host.numpy()
    for key, a in arrays.items():
        staging[offsets[key] : offsets[key] + a.nbytes] = (
            np.ascontiguousarray(a).view(np.uint8).ravel()
        )
    flat = host.to(device, non_blocking=True)
    out = {}
    for key, a in arrays.items():
        dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
        view = flat[offsets[key] : offsets[key] + a.nbytes].view(dtype)
        out[key] = view.view(a.shape)
    return out
