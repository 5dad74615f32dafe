"""Block accounting: allocation, reference counts, the LRU prefix cache, integrity checks."""

from __future__ import annotations

import pytest

from prefixbatch.scheduling.block_manager import BlockManager, OutOfBlocksError


def test_allocate_release_roundtrip():
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert sorted(a + b) == list(range(8)) and bm.num_available == 0
    with pytest.raises(OutOfBlocksError):
        bm.allocate(1)
    bm.check_integrity([a, b])
    bm.release(a)
    assert bm.num_available == 3
    bm.check_integrity([b])


def test_shared_block_needs_every_reference_released():
    bm = BlockManager(4, 4)
    blocks = bm.allocate(2)
    bm.incref(blocks)  # a second holder
    bm.release(blocks)
    assert bm.num_available == 2
    bm.check_integrity([blocks])
    bm.release(blocks)
    assert bm.num_available == 4
    bm.check_integrity([])


def test_integrity_check_catches_leaks_and_wrong_counts():
    bm = BlockManager(4, 4)
    blocks = bm.allocate(2)
    with pytest.raises(AssertionError):
        bm.check_integrity([])  # blocks referenced by nobody: leaked
    with pytest.raises(AssertionError):
        bm.check_integrity([blocks, blocks])  # refcount 1 but two holders


def test_prefix_cache_reuses_and_evicts_lru():
    bm = BlockManager(4, 2, enable_prefix_cache=True)
    tokens_a, tokens_b = [1, 2, 3, 4], [5, 6, 7, 8]
    ha = BlockManager.chain_hashes(tokens_a, 2)
    hb = BlockManager.chain_hashes(tokens_b, 2)
    a = bm.allocate(2)
    for blk, h in zip(a, ha):
        bm.register(blk, h)
    bm.release(a)  # cached, evictable
    assert bm.num_available == 4
    hit = bm.lookup(ha)
    assert hit == a and bm.cache_hits == 2
    bm.release(hit)
    b = bm.allocate(2)  # takes the free blocks first, the cache survives
    for blk, h in zip(b, hb):
        bm.register(blk, h)
    bm.release(b)
    bm.allocate(2)  # must evict two: a's blocks were used less recently than b's
    assert bm.lookup(ha) == []
    assert bm.lookup(hb) == b


def test_chain_hash_depends_on_whole_prefix():
    x = BlockManager.chain_hashes([1, 2, 3, 4], 2)
    y = BlockManager.chain_hashes([9, 9, 3, 4], 2)
    assert x[1] != y[1]  # same second block, different first block
