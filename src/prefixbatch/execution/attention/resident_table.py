"""A device copy of a host array that persists across steps, kept in step by row diffs.

The model runner keeps the block tables of the running sequences and of the live prefix levels
in host arrays across steps (``execution/block_tables.py``) and records the version at which
each row was last written (``AttentionStep.versions``). A backend that reads those arrays on
the device keeps one ``ResidentTable`` per array: each step uploads only the rows written since
the copy was last brought up to date (a new array shape: all of them) with the step's other
inputs, and the kernels read the copy in place, indexed by row. The upload then carries the
rows that changed (a few per step in decode) instead of every scheduled row's blocks, and the
host gathers nothing (vLLM v1 writes its persistent block table on the host and copies it to
the device each step; here the copy is by diffs as well).

On the CPU the device copy is the host array itself (no copy at all), unless ``mirror`` asks
for the diff path (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class ResidentTable:
    """The device copy of one host array (R, W) int32 whose rows carry write versions."""

    def __init__(self, device: torch.device, mirror: bool | None = None) -> None:
        self.device = device
        self.mirror = device.type != "cpu" if mirror is None else mirror
        self.tensor: torch.Tensor | None = None  # the copy, as of version ``synced``
        self.synced = -1

    def stage(
        self, host: np.ndarray, written: np.ndarray, version: int, key: str
    ) -> tuple[dict[str, np.ndarray], Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
        """The host arrays that bring the copy up to ``host`` at ``version`` (``written``:
        (R,) the version of each row's last write), keyed ``key.rows`` (K,) int64 and
        ``key.data`` (K, W) int32, and a function that applies their device copies and returns
        the up-to-date copy (call it once the arrays are uploaded, before anything reads the
        copy; arrays staged and never applied are staged again next time)."""
        if not self.mirror:
            return {}, lambda _: torch.from_numpy(host)
        current = self.tensor
        renew = current is None or tuple(current.shape) != host.shape
        rows = np.arange(host.shape[0]) if renew else np.flatnonzero(written > self.synced)
        arrays = {f"{key}.rows": rows.astype(np.int64), f"{key}.data": host[rows]}

        def apply(t: dict[str, torch.Tensor]) -> torch.Tensor:
            if renew:
                self.tensor = torch.empty(host.shape, dtype=torch.int32, device=self.device)
            assert self.tensor is not None
            if len(rows):
                self.tensor.index_copy_(0, t[f"{key}.rows"], t[f"{key}.data"])
            self.synced = version
            return self.tensor

        return arrays, apply
