"""Sort a batch's prompts by their token ids and find the longest common prefix (LCP) of each
sorted neighbour, vectorised over the token arrays.

The order is lexicographic by token id, a prompt before every prompt it is a prefix of, equal
prompts by index: the order of ``sorted(range(n), key=lambda i: prompts[i])``. With it, the
prompts sharing any prefix are contiguous, and the LCP array describes the whole radix tree
(every node is an "lcp-interval", see ``intervals.py``).

The sort is most-significant-chunk-first: each round compares the next chunk of tokens of the
prompts that are still tied (equal so far), each chunk as one byte string (the tie's rank, then
the tokens as big-endian ``id + 1``, 0 past the end, so a prompt that ends sorts first). A tie
whose prompts all carry the same chunk stays tied without sorting, and after a round that split
nothing the chunk doubles (16 tokens up to 32): requests below one long system prompt cost a
gather and a compare per 32 shared tokens. Memory: a few arrays of prompt count, plus one
round's chunk of the still-tied prompts (128 bytes each) and, in a round that sorts, their keys
once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .token_arrays import TokenArrays

CHUNK, WIDE = 16, 32  # tokens compared per round: after a round that split a tie, and at most
_SLICE = 1 << 18  # prompts gathered at a time


def _gather(prompts: TokenArrays, idx: np.ndarray, depth: int, width: int) -> np.ndarray:
    """(len(idx), width) big-endian uint32: tokens ``depth..depth+width-1`` of prompts ``idx``
    as ``id + 1``, 0 past a prompt's end."""
    out = np.zeros((len(idx), width), dtype=">u4")
    total = len(prompts.ids)
    if total < width:
        return _gather_short(prompts, idx, depth, width)
    windows = sliding_window_view(prompts.ids, width)  # (total - width + 1, width), a view
    span = np.arange(width, dtype=np.int64)
    for s in range(0, len(idx), _SLICE):
        mem = np.argsort(idx[s : s + _SLICE])  # read in memory order: fewer page walks
        part = idx[s : s + _SLICE][mem]
        start = prompts.starts[part] + depth
        vals = windows[np.minimum(start, total - width)].astype(np.uint32) + 1
        vals *= span < (prompts.ends[part] - start)[:, None]
        late = np.flatnonzero(start > total - width)  # the last prompts' ends: shift
        if len(late):
            vals[late] = _gather_short(prompts, part[late], depth, width)
        out[s : s + _SLICE][mem] = vals
    return out


def _gather_short(prompts: TokenArrays, idx: np.ndarray, depth: int, width: int) -> np.ndarray:
    """``_gather`` prompt by prompt, for prompts within ``width`` tokens of the arrays' end."""
    out = np.zeros((len(idx), width), dtype=">u4")
    for row, i in enumerate(idx.tolist()):
        tokens = prompts[i][depth : depth + width]
        out[row, : len(tokens)] = tokens.astype(np.uint32) + 1
    return out


def _as_keys(rows: np.ndarray) -> np.ndarray:
    """Each row as one byte string, which compares (and sorts) like the row."""
    return rows.view(f"S{4 * rows.shape[1]}").ravel()


@dataclass(frozen=True, eq=False)
class SortedPrompts:
    """``order``: (n,) int64 request indices in sorted order; ``lcp``: (n,) int64, ``lcp[k]``
    the common prefix length of sorted prompts ``k - 1`` and ``k`` (``lcp[0] = 0``)."""

    order: np.ndarray
    lcp: np.ndarray


def sort_prompts(prompts: TokenArrays) -> SortedPrompts:
    """The prompts' sorted order and neighbour LCPs (see the module docstring).

    Raises ValueError for a negative token id."""
    n = len(prompts)
    if len(prompts.ids) and int(prompts.ids.min()) < 0:
        raise ValueError("token ids must not be negative")
    lengths = prompts.lengths
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(n, dtype=np.int64)
    active = np.arange(n, dtype=np.int64)  # sorted positions whose order is not final
    starts = np.zeros(n, dtype=bool)  # first position of each tie, over ``active``
    starts[:1] = True
    depth, width = 0, CHUNK
    while len(active) > 1:
        rows = _gather(prompts, order[active], depth, width)
        keys = _as_keys(rows)
        same_tie = ~starts[1:]
        equal = keys[1:] == keys[:-1]
        split = same_tie & ~equal
        resorted = bool(split.any())
        if resorted:  # ties whose chunks differ: sort them by (tie, chunk), stably
            tie = np.cumsum(starts) - 1  # the tie each active position belongs to
            unsorted = np.zeros(int(tie[-1]) + 1, dtype=bool)
            unsorted[tie[1:][split]] = True
            sub = np.flatnonzero(unsorted[tie])
            ranked = np.empty((len(sub), width + 1), dtype=">u4")
            ranked[:, 0] = tie[sub]
            ranked[:, 1:] = rows[sub]
            perm = sub[np.argsort(_as_keys(ranked), kind="stable")]
            del ranked
            order[active[sub]] = order[active[perm]]
            rows[sub] = rows[perm]
            equal = keys[1:] == keys[:-1]
        # Neighbours in one tie: equal chunks stay tied unless the prompts end in it (equal
        # prompts, LCP = their length); otherwise their LCP ends inside this chunk.
        ended = lengths[order[active[1:]]] - depth < width
        done = same_tie & equal & ended
        lcp[active[1:][done]] = lengths[order[active[1:][done]]]
        cut = np.flatnonzero(same_tie & ~equal)
        first_diff = (rows[cut + 1] != rows[cut]).argmax(axis=1)
        lcp[active[cut + 1]] = depth + first_diff
        tied = np.zeros(len(active) + 1, dtype=bool)  # tied[j + 1]: j is tied to j + 1
        tied[1:-1] = same_tie & equal & ~ended
        keep = tied[:-1] | tied[1:]  # tied to a neighbour: still unresolved
        starts = (~tied[:-1])[keep]
        active = active[keep]
        depth += width
        width = CHUNK if resorted else min(2 * width, WIDE)
    return SortedPrompts(order, lcp)
