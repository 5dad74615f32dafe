"""Triton attention over the paged KV cache: shared prefix levels read once per tile of the rows
below them, then every row's own KV, in two launches per layer for any mixed step.

1. ``_prefix_level_kernel`` (grid: prefix tiles x KV heads): the stacked query rows of one level
   (GQA heads packed into M) attend non-causally to the level's KV, which each program reads
   once; it writes a partial output and log-sum-exp per (row, head) at the level's slot of the
   partial buffer (Hydragen; FlashInfer's ``MultiLevelCascadeAttentionWrapper`` computes one
   such partial per level).
2. ``_own_kv_kernel`` (grid: own tiles x KV heads, prefill chunks and decode rows in one launch):
   each tile first merges the partials of the row's levels, depth 0 first, into its
   online-softmax state (the log-sum-exp merge of FlashInfer's ``merge_state``), then runs the
   causal online softmax over ``[shared_len, context_len)`` with the offset
   ``context_len - q_len``, so no separate merge launch is needed.

The loops follow Triton's fused-attention tutorial: scores in base 2 (``scale * log2(e)``, then
``exp2``), fp32 accumulation, one rescale of the accumulator per KV tile. Keys are gathered per
position through the sequence's own block table, which starts at its ``shared_len`` (slot
``table[p // block_size - shared_len // block_size] * block_size + p % block_size``), so tiles
need not align with blocks. fp32 inputs use IEEE dot products (not TF32), so they match
the PyTorch reference to ~1e-6.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_metadata import TritonMetadata

# Globals read inside kernels must be constexpr for the compiler (the interpreter does not care).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: no inf - inf NaN
BLOCK_N = 32  # KV positions per inner-loop tile; untuned


@triton.jit
def _packed_rows(first, limit, kvh, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The M dimension of a tile: ``ROWS`` query rows from ``first`` x the ``G`` query heads of
    KV head ``kvh``. Returns each entry's row, head, and whether it is a real row (< ``limit``)."""
    m = tl.arange(0, BLOCK_M)
    rows = first + m // G
    return rows, kvh * G + m % G, (m < ROWS * G) & (rows < limit)


@triton.jit
def _load_q(q_ptr, rows, heads, ok, stride_qt, stride_qh, d):
    """q rows (BLOCK_M, D) at packed (row, head) pairs; 0 where not ``ok``."""
    offsets = rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    return tl.load(q_ptr + offsets, mask=ok[:, None], other=0.0)


@triton.jit
def _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d):
    """K as (D, BLOCK_N) (ready for q @ k) and V as (BLOCK_N, D) at int64 ``slot``s."""
    k = tl.load(
        k_ptr + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None],
        mask=ok[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    return k, v


@triton.jit
def _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax update with a KV tile; ``valid`` (M, N) masks the scores. Returns the
    new running max (base 2), denominator and unnormalised output, all fp32."""
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefix_level_kernel(
    q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr,
    tile_level_ptr, tile_row0_ptr,
    lvl_row_start_ptr, lvl_row_end_ptr, lvl_len_ptr, lvl_out_ptr, lvl_blocks_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_pt, stride_ph, stride_lt, stride_lvl_blocks,
    qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    lvl = tl.load(tile_level_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    row_start = tl.load(lvl_row_start_ptr + lvl)
    row_end = tl.load(lvl_row_end_ptr + lvl)
    length = tl.load(lvl_len_ptr + lvl)

    rows, heads, row_ok = _packed_rows(row0, row_end, kvh, G, ROWS, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q = _load_q(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, d)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, length, BLOCK_N):  # the level's KV: read once for every row of the tile
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < length
        blk = tl.load(lvl_blocks_ptr + lvl * stride_lvl_blocks + pos // BLOCK_SIZE, mask=ok)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d)
        m_i, l_i, acc = _softmax_step(q, k, v, ok[None, :], m_i, l_i, acc, qk_scale, PRECISION)

    l_safe = tl.where(row_ok, l_i, 1.0)
    out_row = (tl.load(lvl_out_ptr + lvl) + rows - row_start).to(tl.int64)
    tl.store(
        po_ptr + out_row[:, None] * stride_pt + heads[:, None] * stride_ph + d[None, :],
        acc / l_safe[:, None],
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.log2(l_safe)) * _LN2  # natural log, like torch.logsumexp
    tl.store(plse_ptr + out_row * stride_lt + heads, lse, mask=row_ok)


@triton.jit
def _own_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr,
    tile_seq_ptr, tile_q0_ptr,
    seq_q_start_ptr, seq_q_len_ptr, seq_ctx_ptr, seq_shared_ptr, seq_num_levels_ptr,
    block_table_ptr, seq_levels_ptr, lvl_row_start_ptr, lvl_out_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_pt, stride_ph, stride_lt, stride_table, stride_seq_levels,
    qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(seq_q_start_ptr + seq)
    q_len = tl.load(seq_q_len_ptr + seq)
    ctx = tl.load(seq_ctx_ptr + seq)
    shared = tl.load(seq_shared_ptr + seq)
    num_levels = tl.load(seq_num_levels_ptr + seq)

    r, heads, row_ok = _packed_rows(q0, q_len, kvh, G, ROWS, BLOCK_M)  # r: index in new tokens
    rows = (q_start + r).to(tl.int64)
    q_pos = ctx - q_len + r  # causal offset: query r sits at this position
    d = tl.arange(0, HEAD_DIM)
    q = _load_q(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, d)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # A normalised partial (o, lse) over some keys is the state (max=lse, sum=1, acc=o).
    for depth in range(0, num_levels):
        lvl = tl.load(seq_levels_ptr + seq * stride_seq_levels + depth)
        p_row = (tl.load(lvl_out_ptr + lvl) + q_start + r - tl.load(lvl_row_start_ptr + lvl)).to(
            tl.int64
        )
        o_p = tl.load(
            po_ptr + p_row[:, None] * stride_pt + heads[:, None] * stride_ph + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse = tl.load(plse_ptr + p_row * stride_lt + heads, mask=row_ok, other=_NEG) * _LOG2E
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(lse - m_new)
        l_i = l_i * alpha + beta
        acc = acc * alpha[:, None] + o_p * beta[:, None]
        m_i = m_new

    end = ctx - q_len + tl.minimum(q0 + ROWS, q_len)  # one past the tile's last query position
    table = block_table_ptr + seq * stride_table - shared // BLOCK_SIZE  # own blocks from shared
    for n0 in range(shared, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        blk = tl.load(table + pos // BLOCK_SIZE, mask=ok)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d)
        valid = ok[None, :] & (pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, PRECISION)

    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
    stride_kt, stride_vt, stride_ks, stride_vs,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = (i < ROW) & (tl.full([BLOCK], 0, tl.int64) + slot >= 0)  # slot -1: a padding row
    k = tl.load(k_ptr + t * stride_kt + i, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + i, mask=ok)
    tl.store(k_pool_ptr + slot * stride_ks + i, k, mask=ok)
    tl.store(v_pool_ptr + slot * stride_vs + i, v, mask=ok)


def _tile_m(rows: int, group: int) -> int:
    """BLOCK_M for ``rows`` query rows of ``group`` packed heads (tl.dot needs M >= 16)."""
    return max(16, triton.next_power_of_2(rows * group))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 dots


def _check(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> tuple[int, int, int]:
    """(H, KVH, D) after checking the layouts the kernels assume."""
    _, h, dim = q.shape
    kvh = k_pool.shape[1]
    if h % kvh or k_pool.shape != v_pool.shape or k_pool.shape[2] != dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit the pools {tuple(k_pool.shape)}")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head_dim {dim} must be a power of two >= 16")
    if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride(2) != 1:
        raise ValueError("head_dim must be the contiguous dimension")
    return h, kvh, dim


def prefix_partials(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: TritonMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every level's rows against the level's KV: q (T, H, D), pools (slots, KVH, D) ->
    o (num_partials, H, D) fp32 and lse (num_partials, H) fp32 (natural log). The partials of
    level ``i`` are rows ``[level_out[i], level_out[i] + row_end - row_start)``.

    Raises ValueError on shapes the kernels do not take (see ``_check``)."""
    h, kvh, dim = _check(q, k_pool, v_pool)
    o = torch.empty(meta.num_partials, h, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(meta.num_partials, h, dtype=torch.float32, device=q.device)
    tiles = meta.prefix_tile_level.numel()
    if tiles == 0:
        return o, lse
    g = h // kvh
    _prefix_level_kernel[(tiles, kvh)](
        q, k_pool, v_pool, o, lse,
        meta.prefix_tile_level, meta.prefix_tile_row0,
        meta.level_row_start, meta.level_row_end, meta.level_length, meta.level_out,
        meta.level_blocks,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        o.stride(0), o.stride(1), lse.stride(0), meta.level_blocks.stride(0),
        scale * _LOG2E.value,
        G=g, ROWS=meta.prefix_rows, BLOCK_M=_tile_m(meta.prefix_rows, g), BLOCK_N=BLOCK_N,
        HEAD_DIM=dim, BLOCK_SIZE=meta.block_size, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return o, lse


def triton_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: TritonMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every row of the step: q (T, H, D) fp32/fp16/bf16, one layer's pools
    (slots, KVH, D) already holding the step's new K/V -> (T, H, D) in q's dtype.

    Two launches whatever the step holds: the prefix levels (skipped when there are none), then
    the own-KV kernel that merges them. Raises ValueError on shapes the kernels do not take."""
    h, kvh, dim = _check(q, k_pool, v_pool)
    po, plse = prefix_partials(q, k_pool, v_pool, meta, scale)
    out = torch.empty_like(q)
    tiles = meta.own_tile_seq.numel()
    if tiles == 0:
        return out
    g = h // kvh
    _own_kv_kernel[(tiles, kvh)](
        q, k_pool, v_pool, out, po, plse,
        meta.own_tile_seq, meta.own_tile_q0,
        meta.q_start, meta.q_len, meta.context_len, meta.shared_len, meta.num_levels,
        meta.block_table, meta.seq_levels, meta.level_row_start, meta.level_out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        po.stride(0), po.stride(1), plse.stride(0),
        meta.block_table.stride(0), meta.seq_levels.stride(0),
        scale * _LOG2E.value,
        G=g, ROWS=meta.own_rows, BLOCK_M=_tile_m(meta.own_rows, g), BLOCK_N=BLOCK_N,
        HEAD_DIM=dim, BLOCK_SIZE=meta.block_size, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new k, v (T, KVH, D) at ``slot_mapping`` (T,) int32 of the pools (slots, KVH, D);
    a slot of -1 is skipped (padding rows). One launch for K and V."""
    t, kvh, dim = k.shape
    if t == 0:
        return
    if k_pool.stride(1) != dim or k_pool.stride(2) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("each slot of the pools must be one contiguous (KVH, D) run")
    # Each token's (KVH, D) must be one run; a row stride (e.g. a view of fused QKV) is fine.
    if k.stride(1) != dim or k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(1) != dim or v.stride(2) != 1:
        v = v.contiguous()
    row = kvh * dim
    _store_kv_kernel[(t,)](
        k, v, k_pool, v_pool, slot_mapping,
        k.stride(0), v.stride(0), k_pool.stride(0), v_pool.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )  # fmt: skip
