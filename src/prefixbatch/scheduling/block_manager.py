"""KV block accounting: free blocks, reference counts, and (for the fcfs-lru policy) a hash-based
automatic prefix cache whose unreferenced blocks are evicted least-recently-used first.

Allocation keeps a sequence's blocks adjacent where it can: a sequence that grows takes the block
after its last one when that is free, and a new run of blocks starts in the middle of the largest
free gap, so that the runs on both sides of it have room to grow. A block's K (and V) is
``block_size`` consecutive slots of the pool, so adjacent blocks make one long stream for decode
attention: the CPU kernel reads K/V from DRAM 15-20% faster from adjacent blocks than from
scattered ones (``bench/decode_kernel.py``); in a whole job, where part of the K/V comes from
cache, decode attention took 2-3% less time. Where no adjacent block is free, any free block
serves; placement never changes what fits.

Pure Python bookkeeping; the tensors live in ``KVCache``.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free (callers check first)."""


class BlockManager:
    """Hands out block ids; a block is free, referenced (refcount > 0) or cached-evictable."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        # An array, not a list: the garbage collector walks every list's items on each full
        # collection (a pool of 500,000 blocks: 500,000 items), never an array's.
        self.refcount = array("i", bytes(4 * num_blocks))
        self.is_free = np.ones(num_blocks, dtype=np.bool_)
        self.num_free = num_blocks
        # Free blocks per chunk of 2**shift blocks (at most 1,024 chunks), so that finding where
        # a new run goes costs the same in a pool of 500,000 blocks as in one of 1,000.
        self._shift = max(0, (num_blocks - 1).bit_length() - 10)
        self._chunk_size = np.bincount(np.arange(num_blocks) >> self._shift)
        self._chunk_free = self._chunk_size.copy()
        # Automatic prefix cache: content hash <-> block; unreferenced cached blocks in LRU order.
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}
        # A cached block's tokens as int32 bytes, compared on every hit (a tuple would hold an
        # int object per token, among the running sequences' objects).
        self.block_tokens: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cache_hits = 0  # blocks reused from the cache (tokens = hits * block_size)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return self.num_free + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """``n`` blocks, each referenced once, for a block table whose last block is ``after``
        (None: a new table): free blocks first, adjacent to ``after`` and to each other where
        possible (see the module docstring), then evicted cached ones, least recently used first.
        Raises OutOfBlocksError when fewer than ``n`` are available."""
        if n > self.num_available:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_available} available")
        out: list[int] = []
        block = after
        while len(out) < n and self.num_free:
            if block is None or block + 1 == self.num_blocks or not self.is_free[block + 1]:
                block = self._gap_start(n - len(out))
            else:
                block += 1
            self.is_free[block] = False
            self.num_free -= 1
            self._chunk_free[block >> self._shift] -= 1
            out.append(block)
        while len(out) < n:  # evict the least recently used cached block
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_to_hash.pop(block)]
            del self.block_tokens[block]
            out.append(block)
        for block in out:
            self.refcount[block] = 1
        return out

    def _gap_start(self, n: int) -> int:
        """Where a new run of ``n`` free blocks starts: centred in the largest gap of free
        blocks (at its start when the gap is shorter than ``n``). In a pool of over 1,024
        blocks, gaps are measured in wholly free chunks, and once no chunk is wholly free, the
        largest gap is sought in the chunk with the most free blocks."""
        shift = self._shift
        whole = self._chunk_free == self._chunk_size
        if whole.any():
            start, length = largest_run(whole)
            first = start << shift
            size = min(length << shift, self.num_blocks - first)
        else:
            chunk = int(np.argmax(self._chunk_free))
            offset = chunk << shift
            start, size = largest_run(self.is_free[offset : offset + (1 << shift)])
            first = offset + start
        return first + max(0, size - n) // 2

    def incref(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self.refcount[b] == 0:
                self.evictable.pop(b)
            self.refcount[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference per block; unreferenced blocks become free (or evictable)."""
        for b in blocks:
            self.refcount[b] -= 1
            assert self.refcount[b] >= 0, f"block {b} released more often than referenced"
            if self.refcount[b] == 0:
                if b in self.block_to_hash:
                    self.evictable[b] = None
                else:
                    self.is_free[b] = True
                    self.num_free += 1
                    self._chunk_free[b >> self._shift] += 1

    # -- automatic prefix cache (fcfs-lru) ---------------------------------------------------
    def cached_prefix(
        self, tokens: Sequence[int] | np.ndarray, hashes: Sequence[int], usable: int
    ) -> list[int]:
        """Cached blocks holding the first blocks of ``tokens`` (at most ``usable``), found by
        chained hash and confirmed by comparing their tokens. References nothing."""
        bs = self.block_size
        ids = np.asarray(tokens, dtype=np.int32)
        hits = []
        for i, h in enumerate(hashes[:usable]):
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != ids[i * bs : (i + 1) * bs].tobytes():
                break
            hits.append(block)
        return hits

    def take_cached(self, blocks: list[int]) -> None:
        """Reference cache hits found by ``cached_prefix`` (reviving unreferenced ones)."""
        self.incref(blocks)  # also takes them off the evictable list
        self.cache_hits += len(blocks)

    def register(self, block: int, block_hash: int, tokens: Sequence[int] | np.ndarray) -> None:
        """Record that ``block`` holds the KV of the full block ``tokens`` with ``block_hash``."""
        if not self.enable_prefix_cache or block_hash in self.hash_to_block:
            return
        if block in self.block_to_hash:
            return
        self.hash_to_block[block_hash] = block
        self.block_to_hash[block] = block_hash
        self.block_tokens[block] = np.asarray(tokens, dtype=np.int32).tobytes()

    def check_integrity(self, holders: Iterable[Iterable[int]]) -> None:
        """Assert free + referenced + evictable == total and that every refcount equals the
        number of holders (block tables, group prefixes) that list the block."""
        expected = array("i", bytes(4 * self.num_blocks))
        for blocks in holders:
            for b in blocks:
                expected[b] += 1
        assert expected == self.refcount, "refcounts do not match the block tables"
        free_ids = np.flatnonzero(self.is_free)
        free, evictable = set(free_ids.tolist()), set(self.evictable)
        referenced = {b for b, c in enumerate(self.refcount) if c > 0}
        assert len(free) == self.num_free, "the free count does not match the free blocks"
        chunks = np.bincount(free_ids >> self._shift, minlength=len(self._chunk_size))
        assert (chunks == self._chunk_free).all(), "the free counts per chunk do not match"
        assert not (free & evictable) and not (free & referenced) and not (evictable & referenced)
        assert len(free) + len(evictable) + len(referenced) == self.num_blocks, "blocks leaked"
        assert all(b in self.block_to_hash for b in evictable), "evictable block without a hash"


def largest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a 1-D bool array with at least one True
    (the first such run on a tie)."""
    starts = np.concatenate(([0], np.flatnonzero(mask[1:] != mask[:-1]) + 1))
    lengths = np.diff(starts, append=len(mask))
    lengths[~mask[starts]] = 0
    i = int(np.argmax(lengths))
    return int(starts[i]), int(lengths[i])
