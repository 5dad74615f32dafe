"""KV block accounting: a free list, reference counts, and (for the fcfs-lru policy) a hash-based
automatic prefix cache whose unreferenced blocks are evicted least-recently-used first.

Pure Python bookkeeping; the tensors live in ``KVCache``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free (callers check first)."""


class BlockManager:
    """Hands out block ids; a block is free, referenced (refcount > 0) or cached-evictable."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.refcount = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        # Automatic prefix cache: content hash <-> block; unreferenced cached blocks in LRU order.
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # compared on every hit
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cache_hits = 0  # blocks reused from the cache (tokens = hits * block_size)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_available} available")
        out = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:  # evict the least recently used cached block
                block, _ = self.evictable.popitem(last=False)
                del self.hash_to_block[self.block_to_hash.pop(block)]
                del self.block_tokens[block]
            self.refcount[block] = 1
            out.append(block)
        return out

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
                    self.free.append(b)

    # -- automatic prefix cache (fcfs-lru) ---------------------------------------------------
    def cached_prefix(self, tokens: list[int], hashes: list[int], usable: int) -> list[int]:
        """Cached blocks holding the first blocks of ``tokens`` (at most ``usable``), found by
        chained hash and confirmed by comparing their tokens. References nothing."""
        bs = self.block_size
        hits = []
        for i, h in enumerate(hashes[:usable]):
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            hits.append(block)
        return hits

    def take_cached(self, blocks: list[int]) -> None:
        """Reference cache hits found by ``cached_prefix`` (reviving unreferenced ones)."""
        self.incref(blocks)  # also takes them off the evictable list
        self.cache_hits += len(blocks)

    def register(self, block: int, block_hash: int, tokens: list[int]) -> None:
        """Record that ``block`` holds the KV of the full block ``tokens`` with ``block_hash``."""
        if not self.enable_prefix_cache or block_hash in self.hash_to_block:
            return
        if block in self.block_to_hash:
            return
        self.hash_to_block[block_hash] = block
        self.block_to_hash[block] = block_hash
        self.block_tokens[block] = tuple(tokens)

    def check_integrity(self, holders: Iterable[Iterable[int]]) -> None:
        """Assert free + referenced + evictable == total and that every refcount equals the
        number of holders (block tables, group prefixes) that list the block."""
        expected = [0] * self.num_blocks
        for blocks in holders:
            for b in blocks:
                expected[b] += 1
        assert expected == self.refcount, "refcounts do not match the block tables"
        free, evictable = set(self.free), set(self.evictable)
        referenced = {b for b, c in enumerate(self.refcount) if c > 0}
        assert len(free) == len(self.free), "a block is on the free list twice"
        assert not (free & evictable) and not (free & referenced) and not (evictable & referenced)
        assert len(free) + len(evictable) + len(referenced) == self.num_blocks, "blocks leaked"
        assert all(b in self.block_to_hash for b in evictable), "evictable block without a hash"
