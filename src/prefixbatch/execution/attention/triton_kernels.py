"""Triton attention over the paged KV cache: shared prefix levels read once per tile of the rows
below them, then every row's own KV, in two launches per layer for any mixed step (three when a
small step's own KV is split).

1. ``prefix_level_kernel`` (grid: prefix tiles x KV heads x prefix splits): the stacked query
   rows of one level (GQA heads packed into M) attend non-causally to the level's KV (or one
   part of it), which each program reads once; it writes a partial output and log-sum-exp per
   (split, row, head) at the level's slot of the partial buffer (Hydragen; FlashInfer's
   ``MultiLevelCascadeAttentionWrapper`` computes one such partial per level).
2. ``own_kv_kernel`` (grid: own tiles x KV heads x own splits, prefill chunks and decode rows in
   one launch): each tile first merges the partials of the row's levels, depth 0 first, into
   its online-softmax state (the log-sum-exp merge of FlashInfer's ``merge_state``), then runs
   the causal online softmax over ``[shared_len, context_len)`` (or its part of it) with the
   offset ``context_len - q_len``, so no separate merge launch is needed for the levels.
3. ``merge_splits_kernel`` (grid: rows x KV heads), only when the own KV is split: merges each
   row's per-split partials into the output (SGLang's decode reduce, vLLM's
   ``reduce_segments``). When to split is ``kv_splits.py``'s choice.

The loops follow Triton's fused-attention tutorial: scores in base 2 (``scale * log2(e)``, then
``exp2``), fp32 accumulation, one rescale of the accumulator per KV tile. Two compile-time
switches add a layer's ``LayerAttention``: ``SOFTCAP`` caps the scores (``softcap * tanh(s /
softcap)``, Gemma 2) and ``SLIDING`` keeps each query's last ``window`` positions: a tile starts
its KV loop at its first query's window and masks per row, so a prefix level wholly before every
row's window reads nothing and adds an empty partial. ``SINKS`` (gpt-oss's attention sinks, one
logit per query head in every softmax denominator) starts the own-KV state of split 0 at the
sink: running max the sink, denominator 1, nothing accumulated. Keys are gathered per position
through the sequence's own block table, which starts at its ``shared_len`` (slot
``table[p // block_size - shared_len // block_size] * block_size + p % block_size``), so tiles
need not align with blocks. fp32 inputs use IEEE dot products (not TF32), so they match
the PyTorch reference to ~1e-6.

Keys may be wider than values: ``HEAD_DIM`` is the value's lanes, which are also the key's
first lanes, and ``TAIL`` (0: none) the key's further lanes, whose scores are a second dot
product (multi-head latent attention: a key ``[c_kv, k_pe]`` of 512 + 64 lanes whose value is
``c_kv``, kept in the key, so V is a view of the K pool; SGLang's and vLLM's Triton MLA decode
split the key the same way). A KV head's ``G`` query heads may be split over
``HEAD_SPLITS`` programs (MLA's one KV head serves every query head): program ``p`` of axis 1
packs query heads ``[p * G, (p + 1) * G)`` and reads KV head ``p // HEAD_SPLITS``.

No argument whose value changes between steps selects a compiled variant: Triton specialises
integers on ``== 1`` and divisibility by 16 and pointers on 16-byte alignment, and the block
table and level table widths (their row strides), the partial buffers' split strides, the split
counts, and the metadata arrays (views at any offset of one buffer) all change with the step.
They are excluded (``do_not_specialize``, ``do_not_specialize_on_alignment``), so a job compiles
each kernel once per dtype and head layout (and the own-KV kernel once more with its KV split).
``triton_launch.py`` launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals read inside kernels must be constexpr for the compiler (the interpreter does not care).
LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: no inf - inf NaN
BLOCK_N = 32  # KV positions per inner-loop tile; untuned


@triton.jit
def _packed_rows(first, limit, hp, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The M dimension of a tile: ``ROWS`` query rows from ``first`` x the ``G`` query heads of
    head program ``hp``. Returns each entry's row, head, and whether it is a real row
    (< ``limit``)."""
    m = tl.arange(0, BLOCK_M)
    rows = first + m // G
    return rows, hp * G + m % G, (m < ROWS * G) & (rows < limit)


@triton.jit
def _load_q(q_ptr, rows, heads, ok, stride_qt, stride_qh, d):
    """q rows (BLOCK_M, D) at packed (row, head) pairs; 0 where not ``ok``."""
    offsets = rows.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    return tl.load(q_ptr + offsets, mask=ok[:, None], other=0.0)


@triton.jit
def _load_k(k_ptr, slot, ok, kvh, stride_ks, stride_kh, d):
    """K's lanes ``d`` as (len(d), BLOCK_N) (ready for q @ k) at int64 ``slot``s."""
    return tl.load(
        k_ptr + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None],
        mask=ok[None, :],
        other=0.0,
    )


@triton.jit
def _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d):
    """K as (D, BLOCK_N) (ready for q @ k) and V as (BLOCK_N, D) at int64 ``slot``s."""
    k = _load_k(k_ptr, slot, ok, kvh, stride_ks, stride_kh, d)
    v = tl.load(
        v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    return k, v


@triton.jit
def _load_q_tail(
    q_ptr, rows, heads, ok, stride_qt, stride_qh, HEAD_DIM: tl.constexpr, TAIL: tl.constexpr
):  # fmt: skip
    """The query's lanes past the value's, (BLOCK_M, TAIL); 0 (unused) without a ``TAIL``."""
    q_tail = 0.0  # one return: a compile-time branch may rebind it, not return another type
    if TAIL > 0:
        q_tail = _load_q(
            q_ptr, rows, heads, ok, stride_qt, stride_qh, HEAD_DIM + tl.arange(0, TAIL)
        )
    return q_tail


@triton.jit
def _qk(
    q, k, q_tail, k_ptr, slot, ok, kvh, stride_ks, stride_kh,
    HEAD_DIM: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """q . k (BLOCK_M, BLOCK_N) over every key lane: the first ``HEAD_DIM`` (q, k loaded),
    then the ``TAIL`` lanes (``q_tail``, K's loaded here)."""
    dot = tl.dot(q, k, input_precision=PRECISION)
    if TAIL > 0:
        k_tail = _load_k(k_ptr, slot, ok, kvh, stride_ks, stride_kh, HEAD_DIM + tl.arange(0, TAIL))
        dot += tl.dot(q_tail, k_tail, input_precision=PRECISION)
    return dot


@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter and every GPU have it): sign(x) (1 - e) / (1 + e) with
    e = exp(-2 |x|), which never overflows."""
    e = tl.exp2(tl.abs(x) * -2.0 * LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softmax_step(
    dot, v, valid, m_i, l_i, acc, qk_scale, cap_scale,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One online-softmax update with a KV tile of q . k products ``dot`` (M, N); ``valid``
    (M, N) masks the scores. Scores are
    ``dot * qk_scale`` (base 2), or with ``SOFTCAP`` ``tanh(dot * qk_scale) * cap_scale``
    (``qk_scale`` = scale / softcap, ``cap_scale`` = softcap * log2(e)). Returns the new
    running max (base 2), denominator and unnormalised output, all fp32."""
    s = dot * qk_scale
    if SOFTCAP:
        s = _tanh(s) * cap_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _merge_partial(m_i, l_i, acc, o_p, lse):
    """Merge a normalised partial (``o_p`` (M, D), natural-log ``lse`` (M,)) into an online
    softmax state (base-2 max, denominator, unnormalised output): a normalised partial is the
    state (max = lse, sum = 1, acc = o). An empty partial has lse = -1e30 and weighs nothing."""
    lse2 = lse * LOG2E
    m_new = tl.maximum(m_i, lse2)
    alpha = tl.exp2(m_i - m_new)
    beta = tl.exp2(lse2 - m_new)
    return m_new, l_i * alpha + beta, acc * alpha[:, None] + o_p * beta[:, None]


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalised output and natural-log log-sum-exp of a state; (0, -1e30) where it saw no
    key (an empty split, a padding row)."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, _NEG)
    return acc / l_safe[:, None], lse


@triton.jit
def _store_partial(
    o_ptr, lse_ptr, out, lse, rows, heads, ok, d,
    stride_s, stride_t, stride_h, stride_ls, stride_lt,
):  # fmt: skip
    """Store a tile's normalised partial (``out`` (M, D), ``lse`` (M,)) at split
    ``program_id(2)``, int64 ``rows`` of fp32 buffers (splits, rows, H, D) and (splits, rows, H)."""
    split = tl.program_id(2).to(tl.int64)
    at = split * stride_s + rows * stride_t
    tl.store(o_ptr + at[:, None] + heads[:, None] * stride_h + d[None, :], out, mask=ok[:, None])
    tl.store(lse_ptr + split * stride_ls + rows * stride_lt + heads, lse, mask=ok)


@triton.jit
def _split_range(lo, hi, BLOCK_N: tl.constexpr):
    """This program's part ``[start, end)`` of ``[lo, hi)``: split ``program_id(2)`` of
    ``num_programs(2)``, each a whole number of ``BLOCK_N`` tiles (later parts may be empty)."""
    parts = tl.num_programs(2)
    chunk = tl.cdiv(tl.cdiv(hi - lo, parts), BLOCK_N) * BLOCK_N
    start = lo + tl.program_id(2) * chunk
    return start, tl.minimum(start + chunk, hi)


_METADATA_PTRS = (
    "tile_level_ptr", "tile_row0_ptr", "tile_seq_ptr", "tile_q0_ptr",
    "lvl_row_start_ptr", "lvl_row_end_ptr", "lvl_len_ptr", "lvl_out_ptr", "lvl_blocks_ptr",
    "lvl_table_row_ptr", "seq_q_start_ptr", "seq_q_len_ptr", "seq_ctx_ptr", "seq_shared_ptr",
    "seq_num_levels_ptr", "seq_table_row_ptr", "block_table_ptr", "seq_levels_ptr", "slot_ptr",
    "row_pos_ptr", "lvl_start_ptr",
)  # fmt: skip
# Integer arguments that change from step to step (see the module docstring), or from layer to
# layer (the window).
_PER_STEP_INTS = (
    "num_tiles", "stride_lvl_blocks", "stride_table", "stride_seq_levels",
    "stride_ps", "stride_ls", "stride_os", "stride_ols", "prefix_splits", "num_splits", "window",
)  # fmt: skip


def _jit(fn):  # type: ignore[no-untyped-def]
    """``triton.jit`` with the per-step arguments of ``fn`` excluded from specialisation."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(
        fn,
        do_not_specialize=[a for a in names if a in _PER_STEP_INTS],
        do_not_specialize_on_alignment=[a for a in names if a in _METADATA_PTRS],
    )


@triton.jit
def _level_tile(
    q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, lvl_len_ptr, lvl_out_ptr, lvl_blocks_ptr,
    lvl_table_row_ptr, row_pos_ptr, lvl_start_ptr,
    lvl, row0, row_start, row_end,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lvl_blocks,
    qk_scale, cap_scale, window,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, SLIDING: tl.constexpr, TAIL: tl.constexpr, HEAD_SPLITS: tl.constexpr,
):  # fmt: skip
    """One tile of level ``lvl`` (rows from ``row0``), head program ``program_id(1)``, its part
    ``program_id(2)`` of the level's KV: the partial output and log-sum-exp of its rows. With
    ``SLIDING`` a row at position ``p`` reads the level's positions after ``p - window`` only,
    and the tile's loop starts where its first row's window does."""
    hp = tl.program_id(1)
    kvh = hp // HEAD_SPLITS
    length = tl.load(lvl_len_ptr + lvl)
    rows, heads, row_ok = _packed_rows(row0, row_end, hp, G, ROWS, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q = _load_q(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, d)
    q_tail = _load_q_tail(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, HEAD_DIM, TAIL)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo = 0
    if SLIDING:  # level-relative position of each row's first visible key
        seen = tl.load(row_pos_ptr + rows, mask=row_ok, other=2**30) - window + 1
        seen -= tl.load(lvl_start_ptr + lvl)
        lo = tl.minimum(tl.maximum(tl.min(seen, 0), 0), length)
    start, end = _split_range(lo, length, BLOCK_N)
    blocks = lvl_blocks_ptr + tl.load(lvl_table_row_ptr + lvl).to(tl.int64) * stride_lvl_blocks
    for n0 in range(start, end, BLOCK_N):  # the level's KV: read once for every row of the tile
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        blk = tl.load(blocks + pos // BLOCK_SIZE, mask=ok)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d)
        dot = _qk(
            q, k, q_tail, k_ptr, slot, ok, kvh, stride_ks, stride_kh, HEAD_DIM, TAIL, PRECISION
        )
        valid = ok[None, :]
        if SLIDING:
            valid = valid & (pos[None, :] >= seen[:, None])
        m_i, l_i, acc = _softmax_step(
            dot, v, valid, m_i, l_i, acc, qk_scale, cap_scale, PRECISION, SOFTCAP
        )

    out, lse = _finish(m_i, l_i, acc)  # lse: natural log, like torch.logsumexp
    out_row = (tl.load(lvl_out_ptr + lvl) + rows - row_start).to(tl.int64)
    _store_partial(po_ptr, plse_ptr, out, lse, out_row, heads, row_ok, d,
                   stride_ps, stride_pt, stride_ph, stride_ls, stride_lt)  # fmt: skip


@_jit
def prefix_level_kernel(
    q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr,
    tile_level_ptr, tile_row0_ptr, num_tiles,
    lvl_row_start_ptr, lvl_row_end_ptr, lvl_len_ptr, lvl_out_ptr, lvl_blocks_ptr,
    lvl_table_row_ptr, row_pos_ptr, lvl_start_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lvl_blocks,
    qk_scale, cap_scale, window,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, SLIDING: tl.constexpr, TAIL: tl.constexpr, HEAD_SPLITS: tl.constexpr,
):  # fmt: skip
    """Program ``(p, head program, split)`` takes tiles ``p, p + num_programs(0), ...`` of the
    ``num_tiles`` until the list ends or reaches its padding (tiles of the null level, which
    has no rows; padding comes last): a CUDA-graph bucket's padded list then costs the programs
    its work needs, not one per padded tile."""
    tile = tl.program_id(0)
    while tile < num_tiles:
        lvl = tl.load(tile_level_ptr + tile)
        row_start = tl.load(lvl_row_start_ptr + lvl)
        row_end = tl.load(lvl_row_end_ptr + lvl)
        if row_end > row_start:
            _level_tile(
                q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, lvl_len_ptr, lvl_out_ptr, lvl_blocks_ptr,
                lvl_table_row_ptr, row_pos_ptr, lvl_start_ptr,
                lvl, tl.load(tile_row0_ptr + tile), row_start, row_end,
                stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lvl_blocks,
                qk_scale, cap_scale, window,
                G, ROWS, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_SIZE, PRECISION, SOFTCAP, SLIDING,
                TAIL, HEAD_SPLITS,
            )  # fmt: skip
            tile += tl.num_programs(0)
        else:
            tile = num_tiles


@_jit
def own_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr, so_ptr, slse_ptr, sinks_ptr,
    tile_seq_ptr, tile_q0_ptr,
    seq_q_start_ptr, seq_q_len_ptr, seq_ctx_ptr, seq_shared_ptr, seq_num_levels_ptr,
    seq_table_row_ptr, block_table_ptr, seq_levels_ptr, lvl_row_start_ptr, lvl_out_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_table, stride_seq_levels,
    stride_os, stride_ols, prefix_splits,
    qk_scale, cap_scale, window,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, SLIDING: tl.constexpr, SINKS: tl.constexpr,
    TAIL: tl.constexpr, HEAD_SPLITS: tl.constexpr,
):  # fmt: skip
    """With ``SPLIT``, program ``(tile, kvh, s)`` writes the normalised partial of its part of
    the own KV (split 0 also merges the levels) to ``so``/``slse``, fp32 buffers laid out like
    the level partials ``po``/``plse`` (splits, T, H[, D]); without, the output to ``o``. With
    ``SLIDING`` the KV loop starts at the tile's first query's window."""
    tile = tl.program_id(0)
    hp = tl.program_id(1)
    kvh = hp // HEAD_SPLITS
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(seq_q_start_ptr + seq)
    q_len = tl.load(seq_q_len_ptr + seq)
    ctx = tl.load(seq_ctx_ptr + seq)
    shared = tl.load(seq_shared_ptr + seq)
    num_levels = tl.load(seq_num_levels_ptr + seq)

    r, heads, row_ok = _packed_rows(q0, q_len, hp, G, ROWS, BLOCK_M)  # r: index in new tokens
    rows = (q_start + r).to(tl.int64)
    q_pos = ctx - q_len + r  # causal offset: query r sits at this position
    d = tl.arange(0, HEAD_DIM)
    q = _load_q(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, d)
    q_tail = _load_q_tail(q_ptr, rows, heads, row_ok, stride_qt, stride_qh, HEAD_DIM, TAIL)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # The levels' partials (each level's KV parts, in order): merged once, by split 0.
    split = tl.program_id(2)
    if SINKS:  # the sink as a key of value 0, counted once: by split 0
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    for depth in range(0, tl.where(split == 0, num_levels, 0)):
        lvl = tl.load(seq_levels_ptr + seq * stride_seq_levels + depth)
        p_row = (tl.load(lvl_out_ptr + lvl) + q_start + r - tl.load(lvl_row_start_ptr + lvl)).to(
            tl.int64
        )
        po_part, plse_part = po_ptr, plse_ptr  # split 0's partials, then the next split's
        for _ in range(0, prefix_splits):
            o_p = tl.load(
                po_part + p_row[:, None] * stride_pt + heads[:, None] * stride_ph + d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            lse = tl.load(plse_part + p_row * stride_lt + heads, mask=row_ok, other=_NEG)
            po_part += stride_ps
            plse_part += stride_ls
            m_i, l_i, acc = _merge_partial(m_i, l_i, acc, o_p, lse)

    last = ctx - q_len + tl.minimum(q0 + ROWS, q_len)  # one past the tile's last query position
    lo = shared
    if SLIDING:  # the first position the tile's first query sees
        lo = tl.maximum(shared, ctx - q_len + q0 - window + 1)
    start, end = _split_range(lo, last, BLOCK_N)
    # own blocks from shared, in the sequence's row of the (persistent or gathered) table
    table_row = tl.load(seq_table_row_ptr + seq).to(tl.int64)
    table = block_table_ptr + table_row * stride_table - shared // BLOCK_SIZE
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        ok = pos < end
        blk = tl.load(table + pos // BLOCK_SIZE, mask=ok)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = _load_kv(k_ptr, v_ptr, slot, ok, kvh, stride_ks, stride_kh, stride_vs, stride_vh, d)
        dot = _qk(
            q, k, q_tail, k_ptr, slot, ok, kvh, stride_ks, stride_kh, HEAD_DIM, TAIL, PRECISION
        )
        valid = ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            valid = valid & (pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _softmax_step(
            dot, v, valid, m_i, l_i, acc, qk_scale, cap_scale, PRECISION, SOFTCAP
        )

    out, lse = _finish(m_i, l_i, acc)
    if SPLIT:  # laid out like the level partials: (splits, T, H, D) and (splits, T, H)
        _store_partial(so_ptr, slse_ptr, out, lse, rows, heads, row_ok, d,
                       stride_os, stride_pt, stride_ph, stride_ols, stride_lt)  # fmt: skip
    else:
        tl.store(
            o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


@_jit
def merge_splits_kernel(
    so_ptr, slse_ptr, o_ptr, slot_ptr,
    stride_os, stride_st, stride_sh, stride_ols, stride_lt, stride_ot, stride_oh, num_splits,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)``, the ``G`` query heads of head program ``program_id(1)``: the
    log-sum-exp merge of its ``num_splits`` partials (fp32, (splits, T, H[, D])) into the
    output. A padding row of a CUDA-graph bucket (KV slot -1) has no partials and is skipped:
    its output is undefined, as it is without splits."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    heads = tl.program_id(1) * G + g
    ok = (g < G) & (tl.full([BLOCK_G], 0, tl.int32) + tl.load(slot_ptr + t) >= 0)
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    so_part = so_ptr + t * stride_st + heads[:, None] * stride_sh + d[None, :]
    slse_part = slse_ptr + t * stride_lt + heads
    for _ in range(0, num_splits):
        o_p = tl.load(so_part, mask=ok[:, None], other=0.0)
        lse = tl.load(slse_part, mask=ok, other=_NEG)
        m_i, l_i, acc = _merge_partial(m_i, l_i, acc, o_p, lse)
        so_part += stride_os
        slse_part += stride_ols
    out, _ = _finish(m_i, l_i, acc)
    tl.store(
        o_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=ok[:, None],
    )


@_jit
def store_kv_kernel(
    k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
    stride_kt, stride_vt, stride_ks, stride_vs,
    ROW: tl.constexpr, BLOCK: tl.constexpr, STORE_V: tl.constexpr,
):  # fmt: skip
    """Token ``program_id(0)``'s K row, and its V row unless ``STORE_V`` is off (a value kept
    in the key)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = (i < ROW) & (tl.full([BLOCK], 0, tl.int64) + slot >= 0)  # slot -1: a padding row
    k = tl.load(k_ptr + t * stride_kt + i, mask=ok)
    tl.store(k_pool_ptr + slot * stride_ks + i, k, mask=ok)
    if STORE_V:
        v = tl.load(v_ptr + t * stride_vt + i, mask=ok)
        tl.store(v_pool_ptr + slot * stride_vs + i, v, mask=ok)
