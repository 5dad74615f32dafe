"""Block accounting: allocation, reference counts, the LRU prefix cache, integrity checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.planning.block_hash import chain_hashes
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


def register(bm: BlockManager, blocks: list[int], tokens: list[int]) -> None:
    bs = bm.block_size
    for i, (blk, h) in enumerate(zip(blocks, chain_hashes(tokens, bs))):
        bm.register(blk, h, tokens[i * bs : (i + 1) * bs])


def lookup(bm: BlockManager, tokens: list[int]) -> list[int]:
    hits = bm.cached_prefix(tokens, chain_hashes(tokens, bm.block_size), len(tokens))
    bm.take_cached(hits)
    return hits


def test_prefix_cache_reuses_and_evicts_lru():
    bm = BlockManager(4, 2, enable_prefix_cache=True)
    tokens_a, tokens_b = [1, 2, 3, 4], [5, 6, 7, 8]
    a = bm.allocate(2)
    register(bm, a, tokens_a)
    bm.release(a)  # cached, evictable
    assert bm.num_available == 4
    hit = lookup(bm, tokens_a)
    assert hit == a and bm.cache_hits == 2
    bm.release(hit)
    b = bm.allocate(2)  # takes the free blocks first, the cache survives
    register(bm, b, tokens_b)
    bm.release(b)
    bm.allocate(2)  # must evict two: a's blocks were used less recently than b's
    assert lookup(bm, tokens_a) == []
    assert lookup(bm, tokens_b) == b


def test_cache_hit_compares_tokens_not_only_the_hash():
    """A hash collision must not hand out another prefix's KV."""
    bm = BlockManager(4, 2, enable_prefix_cache=True)
    a = bm.allocate(2)
    register(bm, a, [1, 2, 3, 4])
    bm.release(a)
    colliding = [9, 9, 8, 8]
    # The hashes of [1, 2, 3, 4] presented with other tokens: a collision by construction.
    forged = chain_hashes([1, 2, 3, 4], 2)
    assert bm.cached_prefix(colliding, forged, 2) == []
    assert bm.cached_prefix([1, 2, 3, 4], forged, 2) == a


def test_chain_hash_depends_on_whole_prefix():
    x = chain_hashes([1, 2, 3, 4], 2)
    y = chain_hashes([9, 9, 3, 4], 2)
    assert x[1] != y[1]  # same second block, different first block


def test_growing_tables_keep_their_blocks_adjacent():
    """Tables that grow one block at a time, interleaved (decode), each stay one run."""
    bm = BlockManager(64, 4)
    tables = [bm.allocate(2) for _ in range(3)]  # three prompts
    for _ in range(5):  # then one block each per round, in turn
        for t in tables:
            t += bm.allocate(1, t[-1])
    for t in tables:
        assert t == list(range(t[0], t[0] + len(t))), t
    bm.check_integrity(tables)


def test_a_new_run_starts_in_the_middle_of_the_largest_gap():
    bm = BlockManager(20, 4)
    first = bm.allocate(2)
    assert first == [9, 10]  # centred in 0..19
    assert bm.allocate(2) == [3, 4]  # gaps 0..8 and 11..19 tie: the first one
    assert bm.allocate(2) == [14, 15]  # the largest gap left is 11..19
    assert bm.allocate(1, 10) == [11]  # the first table grows into its own room
    assert bm.allocate(3, 15) == [16, 17, 18]


def test_allocation_falls_back_to_any_free_block():
    bm = BlockManager(4, 4)
    a = bm.allocate(1)
    b = bm.allocate(1, a[0])  # adjacent
    assert b == [a[0] + 1]
    rest = bm.allocate(2, b[0])  # partly adjacent, the rest wherever blocks are free
    assert sorted(a + b + rest) == [0, 1, 2, 3]
    bm.check_integrity([a, b, rest])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 5)), max_size=60))
def test_allocation_never_hands_out_a_block_twice(ops: list[tuple[bool, int, int]]):
    """Random grows (after a table's last block) and frees of eight tables: every block is held
    by at most one table, the counts add up, and a table grows adjacently whenever the block after
    its last one is free."""
    bm = BlockManager(24, 4)
    tables: list[list[int]] = [[] for _ in range(8)]
    for grow, i, n in ops:
        t = tables[i]
        if not grow:
            bm.release(t)
            t.clear()
            continue
        if n > bm.num_available:
            with pytest.raises(OutOfBlocksError):
                bm.allocate(n, t[-1] if t else None)
            continue
        next_free = bool(t) and t[-1] + 1 < bm.num_blocks and bool(bm.is_free[t[-1] + 1])
        new = bm.allocate(n, t[-1] if t else None)
        assert len(new) == n
        if next_free:
            assert new[0] == t[-1] + 1
        t += new
        bm.check_integrity(tables)


def test_a_large_pool_places_new_runs_by_wholly_free_chunks():
    """Over 1,024 blocks the gaps are measured in chunks (here of 2 blocks); once no chunk is
    wholly free, the new run goes to the largest gap of the chunk with the most free blocks."""
    bm = BlockManager(1100, 4)
    everything = bm.allocate(1100)
    assert everything == list(range(1100))  # one run from the start: the pool was one gap
    odd = everything[1::2]
    bm.release(odd)  # every chunk {2i, 2i + 1} half free: none wholly free
    assert bm.allocate(1) == [1]  # the first chunk with the most free blocks
    bm.release([10, 12])  # chunks {10, 11} and {12, 13} wholly free now
    assert bm.allocate(1) == [11]  # centred in blocks 10..13
    held = [b for b in everything if b % 2 == 0 and b not in (10, 12)] + [1, 11]
    bm.check_integrity([[b] for b in held])
