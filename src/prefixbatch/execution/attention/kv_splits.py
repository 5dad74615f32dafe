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


def busy_tiles(tiles: int, rows: int, rows_per_tile: int, padded: bool) -> int:
    """Tiles of a work list that hold work: all of them, unless the list is padded to a
    CUDA-graph bucket (fixed sizes; the step's own count lives on the device), then at most
    one per ``rows_per_tile`` of the ``rows`` (one per tile-full of each level's rows: more
    only when levels nest or split their rows unevenly)."""
    return min(tiles, -(-rows // max(1, rows_per_tile))) if padded else tiles


def choose_splits(prefix_busy: int, own_busy: int, heads: int, target: int) -> KVSplits:
    """Splits of a step whose grids are ``prefix_busy`` / ``own_busy`` busy tiles x
    ``heads`` head programs (``busy_tiles``; one per KV head, or several when a KV head's
    query heads are split), aiming at ``target`` programs (e.g. twice the SMs; 0 never
    splits)."""
    return KVSplits(
        prefix=splits_for(prefix_busy * heads, target),
        own=splits_for(own_busy * heads, target),
    )
