"""The paged KV cache and how large it is.

Layout: one pool per K and V of shape (layers, num_blocks * block_size, kv_heads, head_dim). A
token at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of a layer's pool. The block manager (scheduling) decides which blocks belong to
whom; this module only holds the tensors and sizes them.
"""

from __future__ import annotations

import torch

from ..config import EngineConfig, ModelConfig
from ..errors import KVBudgetError

# The CPU pool is zeroed up front (see KVCache), so its default size is capped.
CPU_DEFAULT_CAP = 4 * 2**30


class KVCache:
    """Preallocated K and V pools."""

    def __init__(
        self,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        # Zeroed: a padded decode reads the unwritten tail of a sequence's last block (masked
        # out, but uninitialised memory could hold NaN, and 0 * NaN poisons the softmax sum).
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, KVH, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    @staticmethod
    def bytes_per_block(
        layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def available_memory() -> int:
    """Bytes of memory available on the host (MemAvailable from /proc/meminfo; 4 GiB when it
    cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def kv_pool_blocks(config: EngineConfig, cfg: ModelConfig) -> tuple[int, int]:
    """(blocks in the KV pool, bytes per block): ``kv_cache_memory`` bytes, or a
    ``kv_cache_fraction`` of free memory (on the CPU at most ``CPU_DEFAULT_CAP``). On CUDA without
    a budget this is an estimate from free memory (the plan report); the engine sizes its pool
    with a profiling forward instead (``kv_memory.gpu_kv_blocks``).

    Raises ``KVBudgetError`` when the budget holds no block at all.
    """
    per_block = KVCache.bytes_per_block(
        cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, config.torch_dtype
    )
    budget = config.kv_cache_memory
    if budget is None and config.torch_device.type == "cuda":
        budget = int(
            torch.cuda.mem_get_info(config.torch_device)[0] * config.gpu_memory_utilization
        )
    elif budget is None:
        budget = min(int(available_memory() * config.kv_cache_fraction), CPU_DEFAULT_CAP)
    if budget < per_block:
        raise KVBudgetError(
            f"a KV budget of {budget} bytes holds no KV block ({per_block} bytes each); "
            "raise --kv-cache-memory"
        )
    return budget // per_block, per_block
