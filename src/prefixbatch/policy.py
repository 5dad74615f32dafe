"""Scheduling policies: how a batch is ordered, shared and capped."""

from __future__ import annotations

import enum

from .errors import ConfigError


class Policy(str, enum.Enum):
    """``batchllm``: the global plan (nested prefix groups computed once, decode-ratio order,
    steps bounded by KV memory). ``fcfs-lru``: file order with a hash-based automatic prefix cache
    and LRU eviction and a request cap (what vLLM does). ``fcfs``: file order, no sharing."""

    BATCHLLM = "batchllm"
    FCFS_LRU = "fcfs-lru"
    FCFS = "fcfs"

    @property
    def plans(self) -> bool:
        """Whether the batch is planned as a whole (prefix groups, decode-ratio order)."""
        return self is Policy.BATCHLLM

    @property
    def prefix_cache(self) -> bool:
        """Whether finished blocks stay in an automatic prefix cache."""
        return self is Policy.FCFS_LRU

    @property
    def caps_requests(self) -> bool:
        """Whether running requests are capped by count (``max_num_seqs``)."""
        return self is not Policy.BATCHLLM

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ConfigError(f"unknown policy {value!r}; use {names}") from None
