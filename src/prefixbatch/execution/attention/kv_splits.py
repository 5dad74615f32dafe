"""How many parts the KV length of a decode step is split into, so that a small grid fills the
GPU (split-KV, "flash decoding").

A decode step of few rows launches few programs: 8 prefix levels x 8 KV heads is 64 programs on
an H200's 132 SMs, each walking 2,000 keys alone. Splitting each program's KV range into ``n``
parts gives ``n`` times the programs, each writing a partial output and log-sum-exp that are
merged afterwards (SGLang's decode attention: ``num_kv_splits`` + a reduce kernel; vLLM's
unified attention: segments + ``reduce_segments``; FlashInfer's split-KV decode + ``merge_state``).

The count depends only on sizes the host knows without reading the device (tiles, rows, KV
heads), so a CUDA-graph bucket always gets the same count: its padded metadata has fixed sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Most splits of one program's KV range (vLLM's unified attention uses 16 segments).
MAX_SPLITS = 16


@dataclass(frozen=True)
class KVSplits:
    """Parts each prefix level's KV (``prefix``) and each row's own KV (``own``) is split into;
    1 is no split. Every part covers a whole number of the kernels' KV tiles."""

    prefix: int = 1
    own: int = 1


NO_SPLITS = KVSplits()


def splits_for(programs: int, target: int, max_splits: int = MAX_SPLITS) -> int:
    """The power of two ``n <= max_splits`` with ``programs * n >= target`` (the smallest such,
    or ``max_splits``); 1 when ``programs`` already reaches ``target`` or there is no work."""
    if programs <= 0 or programs >= target:
        return 1
    n = 1
    while programs * n < target and n < max_splits:
        n *= 2
    return n


def choose_splits(
    prefix_tiles: int, own_tiles: int, rows: int, prefix_rows: int, kv_heads: int, target: int
) -> KVSplits:
    """Splits of a step whose grids are ``prefix_tiles`` / ``own_tiles`` x ``kv_heads`` programs
    over ``rows`` query rows (``prefix_rows`` per prefix tile), aiming at ``target`` programs
    (e.g. twice the SMs; 0 never splits). Padded metadata (a CUDA-graph bucket) has more tiles
    than work: the rows bound the tiles that do any (one own tile per row at most, and about
    ``rows / prefix_rows`` prefix tiles)."""
    busy_prefix = min(prefix_tiles, -(-rows // max(1, prefix_rows)))
    busy_own = min(own_tiles, rows)
    return KVSplits(
        prefix=splits_for(busy_prefix * kv_heads, target) if prefix_tiles else 1,
        own=splits_for(busy_own * kv_heads, target),
    )
