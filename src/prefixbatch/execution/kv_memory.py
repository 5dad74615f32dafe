"""How many blocks the KV pool gets: a byte budget, or on a CUDA device a profiling run.

With ``kv_cache_memory`` set, or on the CPU, the pool is a byte budget (``kv_pool_blocks``: the
CPU default is a share of available memory). On CUDA without a budget it is sized like vLLM's
``gpu_memory_utilization`` (vLLM docs, "Engine arguments"; ``Worker.determine_available_memory``):
the engine may use ``utilization`` of the device's total memory. After the weights are loaded,
one forward at the largest step the scheduler can make (``max_num_batched_tokens`` tokens, and
sampling for as many rows as a step can sample) is run with the allocator's peak counter reset.
The KV pool gets what is left of the budget after that peak (weights + activations, as seen by
PyTorch's allocator) and after memory outside PyTorch's allocator (the CUDA context, cuBLAS
workspaces, other processes on the device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import EngineConfig, ModelConfig
from ..errors import KVBudgetError
from .kv_cache import KVCache

# The CPU pool is zeroed up front (see KVCache), so its default size is capped.
CPU_DEFAULT_CAP = 4 * 2**30


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes measured on one device after the profiling forward."""

    total: int  # the device's memory
    peak_allocated: int  # torch.cuda.max_memory_allocated during profiling (weights included)
    non_torch: int  # memory in use that PyTorch's allocator does not hold

    def kv_cache_bytes(self, utilization: float) -> int:
        """Bytes left for the KV pool under ``utilization`` of the device (may be negative)."""
        return int(self.total * utilization) - self.peak_allocated - self.non_torch


def kv_blocks_from_profile(profile: MemoryProfile, utilization: float, bytes_per_block: int) -> int:
    """Blocks the KV pool can hold: ``(total * utilization - peak - non-torch) // block``.

    Raises ``ValueError`` for a ``utilization`` outside (0, 1] and ``KVBudgetError`` when not one
    block is left (the message gives the numbers and what to change).
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    free = profile.kv_cache_bytes(utilization)
    blocks = max(free, 0) // bytes_per_block
    if blocks < 1:
        gib = 2**30
        raise KVBudgetError(
            f"no memory left for the KV cache: {utilization:.0%} of {profile.total / gib:.1f} GiB "
            f"is {profile.total * utilization / gib:.1f} GiB, and the weights and activations "
            f"peak at {profile.peak_allocated / gib:.1f} GiB, with "
            f"{profile.non_torch / gib:.1f} GiB used outside PyTorch; one KV block needs "
            f"{bytes_per_block} bytes. Raise "
            "gpu_memory_utilization, lower max_num_batched_tokens or use a smaller model"
        )
    return blocks


def profile_memory(run_largest_step: Callable[[], object], device: torch.device) -> MemoryProfile:
    """Run ``run_largest_step`` (one forward and sampling at the largest step size, with the
    weights loaded and no KV pool allocated yet) and measure the device's memory around it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_largest_step()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    non_torch = max(total - free - torch.cuda.memory_reserved(device), 0)
    torch.cuda.empty_cache()
    return MemoryProfile(total=total, peak_allocated=peak, non_torch=non_torch)


def gpu_kv_blocks(
    run_largest_step: Callable[[], object],
    device: torch.device,
    bytes_per_block: int,
    utilization: float = 0.9,
) -> int:
    """Blocks for the KV pool on ``device`` after profiling ``run_largest_step``."""
    return kv_blocks_from_profile(
        profile_memory(run_largest_step, device), utilization, bytes_per_block
    )


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
    ``kv_cache_fraction`` of free memory (on the CPU at most ``CPU_DEFAULT_CAP``). A block's
    bytes are what the model's ``KVLayout`` stores (MLA: the compressed latent alone). On CUDA
    without a budget this is an estimate from free memory (the plan report); the worker sizes
    its pool with a profiling forward instead (``gpu_kv_blocks``).

    Raises ``KVBudgetError`` when the budget holds no block at all.
    """
    per_block = KVCache.bytes_per_block(
        cfg.num_layers, config.block_size, cfg.kv_layout, config.torch_dtype
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
