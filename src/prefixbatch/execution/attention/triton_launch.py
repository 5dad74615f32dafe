"""Launching the Triton attention kernels (``triton_kernels.py``) for one step: layout checks,
tile sizes, the partial buffers, and the grids.

Per layer: ``write_kv`` stores the step's new K/V (one launch), then ``triton_attention`` runs
the prefix levels (skipped without levels), the own KV merged with them, and, when the own KV is
split (``kv_splits.py``), the merge of its parts. A KV head's query heads are packed into one
program's tile up to ``MAX_PACKED_HEADS`` of them, and split over programs beyond
(``heads_per_program``: MLA's one KV head serves all 16 to 128 query heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import triton_kernels as kernels
from .backend import FULL_ATTENTION, LayerAttention
from .kv_splits import NO_SPLITS, KVSplits, busy_tiles
from .triton_metadata import TritonMetadata

# Query heads one program packs at most (SGLang's and vLLM's Triton MLA decode tile 16 heads:
# a (16, 512) fp32 accumulator fits a GPU program's registers, a (128, 512) one does not).
MAX_PACKED_HEADS = 16


def heads_per_program(group: int) -> int:
    """Query heads a program packs of a KV head's ``group``: all of them up to
    ``MAX_PACKED_HEADS``, else the largest divisor of ``group`` below it."""
    if group <= MAX_PACKED_HEADS:
        return group
    return max(g for g in range(1, MAX_PACKED_HEADS + 1) if group % g == 0)


def _tile_m(rows: int, group: int) -> int:
    """BLOCK_M for ``rows`` query rows of ``group`` packed heads (tl.dot needs M >= 16)."""
    return max(16, triton.next_power_of_2(rows * group))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 dots


def _scores(scale: float, attn: LayerAttention) -> dict[str, float | int | bool]:
    """The kernels' score arguments for a layer: ``qk_scale`` and ``cap_scale`` (see
    ``_softmax_step``), the ``window`` and the ``SOFTCAP`` / ``SLIDING`` switches."""
    log2e = kernels.LOG2E.value
    cap = attn.softcap
    return {
        "qk_scale": scale * log2e if cap is None else scale / cap,
        "cap_scale": 1.0 if cap is None else cap * log2e,
        "window": attn.window or 0,
        "SOFTCAP": cap is not None,
        "SLIDING": attn.window is not None,
    }


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def head_layout(key_dim: int, value_dim: int) -> str | None:
    """Why the kernels cannot take keys of ``key_dim`` lanes with values of ``value_dim``
    (the value's lanes, a power of two >= 16, and the key's further lanes, none or a power of
    two >= 16), or None when they can."""
    tail = key_dim - value_dim
    if not _power_of_two(value_dim) or tail < 0 or (tail and not _power_of_two(tail)):
        return (
            f"a key of {key_dim} lanes and a value of {value_dim}: the value's lanes and the "
            "key's lanes past them must be powers of two >= 16 (or none past them)"
        )
    return None


@dataclass(frozen=True)
class Heads:
    """The head layout a launch runs: ``h`` query heads, ``kvh`` KV heads, ``dim`` value lanes
    (= the key's first lanes), ``tail`` the key's lanes past them, ``g`` query heads per
    program and ``splits`` programs per KV head."""

    h: int
    kvh: int
    dim: int
    tail: int
    g: int
    splits: int


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> Heads:
    """The launch's head layout after checking the layouts the kernels assume."""
    _, h, dim = q.shape
    kvh, dv = k_pool.shape[1], v_pool.shape[2]
    if h % kvh or k_pool.shape[:2] != v_pool.shape[:2] or k_pool.shape[2] != dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit the pools {tuple(k_pool.shape)}")
    why = head_layout(dim, dv)
    if why is not None:
        raise ValueError(why)
    if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise ValueError("head_dim must be the contiguous dimension")
    g = heads_per_program(h // kvh)
    return Heads(h, kvh, dv, dim - dv, g, h // kvh // g)


def prefix_partials(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: TritonMetadata,
    scale: float,
    splits: int = 1,
    attn: LayerAttention = FULL_ATTENTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every level's rows against the level's KV, split into ``splits`` parts of whole KV
    tiles: q (T, H, D), pools (slots, KVH, D) and (slots, KVH, Dv) -> o (splits, num_partials,
    H, Dv) fp32 and lse
    (splits, num_partials, H) fp32 (natural log; -1e30 for a part past the level's end or
    before a row's sliding window). The
    partials of level ``i`` are rows ``[level_out[i], level_out[i] + row_end - row_start)``.
    Padded metadata (a CUDA-graph bucket) launches programs for the tiles its rows can fill,
    each taking further tiles until the padding (``busy_tiles``).

    Raises ValueError on shapes the kernels do not take (see ``_check``)."""
    hs = _check(q, k_pool, v_pool)
    o = torch.empty(splits, meta.num_partials, hs.h, hs.dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, meta.num_partials, hs.h, dtype=torch.float32, device=q.device)
    tiles = meta.prefix_tile_level.numel()
    if tiles == 0:
        return o, lse
    g = hs.g
    programs = busy_tiles(tiles, meta.num_rows, meta.prefix_rows, meta.padded)
    kernels.prefix_level_kernel[(programs, hs.kvh * hs.splits, splits)](
        q, k_pool, v_pool, o, lse,
        meta.prefix_tile_level, meta.prefix_tile_row0, tiles,
        meta.level_row_start, meta.level_row_end, meta.level_length, meta.level_out,
        meta.level_blocks, meta.level_row, meta.row_position, meta.level_start,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        meta.level_blocks.stride(0),
        **_scores(scale, attn),
        G=g, ROWS=meta.prefix_rows, BLOCK_M=_tile_m(meta.prefix_rows, g), BLOCK_N=kernels.BLOCK_N,
        HEAD_DIM=hs.dim, BLOCK_SIZE=meta.block_size, PRECISION=_precision(q.dtype),
        TAIL=hs.tail, HEAD_SPLITS=hs.splits,
    )  # fmt: skip
    return o, lse


def triton_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: TritonMetadata,
    scale: float,
    splits: KVSplits = NO_SPLITS,
    attn: LayerAttention = FULL_ATTENTION,
) -> torch.Tensor:
    """Attention of every row of the step: q (T, H, D) fp32/fp16/bf16, one layer's pools
    (slots, KVH, D) and (slots, KVH, Dv) (V: K's first lanes, or a pool of its own) already
    holding the step's new K/V -> (T, H, Dv) in q's dtype, with the layer's sliding window,
    soft-cap and sinks (``attn``).

    Two launches whatever the step holds: the prefix levels (skipped when there are none), then
    the own-KV kernel that merges them; a third merges the own KV's parts when ``splits.own``
    is above 1. Raises ValueError on shapes the kernels do not take."""
    hs = _check(q, k_pool, v_pool)
    h, dim, g, programs = hs.h, hs.dim, hs.g, hs.kvh * hs.splits
    po, plse = prefix_partials(q, k_pool, v_pool, meta, scale, splits.prefix, attn)
    out = q.new_empty(q.shape[0], h, dim)
    tiles = meta.own_tile_seq.numel()
    if tiles == 0:
        return out
    split_own = splits.own > 1
    if split_own:  # the own KV's parts, laid out like the level partials
        so = torch.empty(splits.own, q.shape[0], h, dim, dtype=torch.float32, device=q.device)
        slse = torch.empty(splits.own, q.shape[0], h, dtype=torch.float32, device=q.device)
    else:
        so, slse = po, plse  # not read
    sinks = attn.sinks
    kernels.own_kv_kernel[(tiles, programs, splits.own)](
        q, k_pool, v_pool, out, po, plse, so, slse, plse if sinks is None else sinks,
        meta.own_tile_seq, meta.own_tile_q0,
        meta.q_start, meta.q_len, meta.context_len, meta.shared_len, meta.num_levels,
        meta.table_row, meta.block_table, meta.seq_levels, meta.level_row_start, meta.level_out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1),
        meta.block_table.stride(0), meta.seq_levels.stride(0),
        so.stride(0), slse.stride(0), splits.prefix,
        **_scores(scale, attn),
        G=g, ROWS=meta.own_rows, BLOCK_M=_tile_m(meta.own_rows, g), BLOCK_N=kernels.BLOCK_N,
        HEAD_DIM=dim, BLOCK_SIZE=meta.block_size, PRECISION=_precision(q.dtype),
        SPLIT=split_own, SINKS=sinks is not None, TAIL=hs.tail, HEAD_SPLITS=hs.splits,
    )  # fmt: skip
    if split_own:
        kernels.merge_splits_kernel[(q.shape[0], programs)](
            so, slse, out, meta.slot_mapping,
            so.stride(0), so.stride(1), so.stride(2), slse.stride(0), slse.stride(1),
            out.stride(0), out.stride(1), splits.own,
            G=g, BLOCK_G=triton.next_power_of_2(g), HEAD_DIM=dim,
        )  # fmt: skip
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
    store_v: bool = True,
) -> None:
    """Store new k, v (T, KVH, D) at ``slot_mapping`` (T,) int32 of the pools (slots, KVH, D);
    a slot of -1 is skipped (padding rows). One launch for K and V; K alone without
    ``store_v`` (a value kept in the key: v is not read)."""
    t, kvh, dim = k.shape
    if t == 0:
        return
    contiguous = k_pool.stride(1) == dim and k_pool.stride(2) == 1
    if not contiguous or (store_v and v_pool.stride() != k_pool.stride()):
        raise ValueError("each slot of the pools must be one contiguous (KVH, D) run")
    # Each token's (KVH, D) must be one run; a row stride (e.g. a view of fused QKV) is fine.
    if k.stride(1) != dim or k.stride(2) != 1:
        k = k.contiguous()
    if store_v and (v.stride(1) != dim or v.stride(2) != 1):
        v = v.contiguous()
    row = kvh * dim
    kernels.store_kv_kernel[(t,)](
        k, v, k_pool, v_pool, slot_mapping,
        k.stride(0), v.stride(0), k_pool.stride(0), v_pool.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row), STORE_V=store_v,
    )  # fmt: skip
