"""Chained hashes of a token sequence's full KV blocks, for an automatic prefix cache.

Block ``i``'s hash covers blocks ``0..i`` (each hash is chained to its predecessor), so equal
hashes mean equal whole prefixes up to a hash collision; a cache that finds a block by hash
compares the block's tokens before reusing it. Used by the block manager's cache (fcfs-lru);
the plan report's simulation of that cache names blocks exactly instead (``report.py``).
"""

from __future__ import annotations

from collections.abc import Sequence


def chain_hashes(
    tokens: Sequence[int], block_size: int, start: int = 0, parent: int | None = None
) -> list[int]:
    """Hashes of the full blocks of ``tokens`` from block ``start`` on; ``parent`` is the hash
    of block ``start - 1`` (None for the first block)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(parent)
    return out
