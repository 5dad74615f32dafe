"""The CPU attention kernels (``csrc/paged_decode.cpp``, ``csrc/prefix_levels.cpp``,
``csrc/prefill_attention.cpp``, ``csrc/kv_write.cpp``), compiled on first use into one module,
and the ``cpu`` backend that runs them.

The attention kernels read K/V straight from the paged pool, with no gathered copy of a context.
``paged_decode`` attends one query token per sequence over its blocks. ``attend_prefix_levels``
reads each shared prefix level once for all the decode rows below it and merges it into their
results by log-sum-exp (cascade attention, after BatchLLM, Hydragen and FlashInfer).
``prefill_attention`` attends prefill chunks causally over their sequences. ``write_kv`` stores
a step's new K/V rows. Each attention kernel takes the layer's sliding window (reading only the
blocks inside it) and soft-cap (``LayerAttention``); sinks join the prefill kernel's softmax
and, for decode rows, the merged result by its log-sum-exp (``with_sinks``). Values may be
narrower than keys and kept inside them (multi-head latent attention's compressed cache,
``csrc/value_pool.h``): the kernels read V through its own slot and head strides, and only K
is written. The build
(``native_build.py``) happens once per machine and source version; without a C++ compiler, or
with ``kernels="torch"``, the engine keeps the plain PyTorch path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch

from ..kv_cache import KVCache
from ..native_build import build_extension
from ..upload import Staged
from .backend import (
    FULL_ATTENTION,
    AttentionBackend,
    DecodeBatch,
    LayerAttention,
    padded_rows,
    slot_mapping,
    with_sinks,
)
from .reference import ContextPlan
from .step import AttentionStep

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(
    CSRC / name
    for name in ("paged_decode.cpp", "prefix_levels.cpp", "prefill_attention.cpp", "kv_write.cpp")
)


class DecodeKernels(Protocol):
    """The compiled module."""

    def paged_decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
        softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, D) against the first ``lengths[b]`` positions held in blocks
        ``block_tables[b]`` (B, NB) int64 of the pools (slots, KVH, D) and (slots, KVH, Dv)
        (its own pool or K's first lanes) -> out (B, H, Dv) and the
        log-sum-exp of the scores, lse (B, H). fp32; q may be a row-strided view. ``window``
        > 0: only each row's last ``window`` positions; ``softcap`` > 0: soft-capped scores
        (``LayerAttention``; 0 is off for both)."""
        ...

    def attend_prefix_levels(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        level_tables: torch.Tensor,
        level_lengths: torch.Tensor,
        level_row_ptr: torch.Tensor,
        level_rows: torch.Tensor,
        block_size: int,
        scale: float,
        level_starts: torch.Tensor,
        positions: torch.Tensor,
        window: int,
        softcap: float,
    ) -> None:
        """Merges prefix levels (``DecodeLevels``' fields, in order) into ``out`` and ``lse``
        (``paged_decode``'s, over the rows' own blocks), in place. With ``window`` > 0 a row
        at position ``positions[b]`` reads only the level positions after
        ``positions[b] - window`` (a level starts at ``level_starts[l]``)."""
        ...

    def prefill_attention(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        out: torch.Tensor,
        block_tables: torch.Tensor,
        q_start: torch.Tensor,
        q_len: torch.Tensor,
        context_len: torch.Tensor,
        block_size: int,
        scale: float,
        window: int,
        softcap: float,
        sinks: torch.Tensor,
    ) -> None:
        """Fills ``out`` (T, H, Dv) contiguous at each chunk's rows ``[q_start[s], + q_len[s])``:
        their causal attention over positions ``[0, context_len[s])`` held in
        ``block_tables[s]`` (S, NB), each query's last ``window`` only for ``window`` > 0,
        ``sinks`` (H,) fp32 in every softmax denominator (empty: none). q (T, H, D) may be a
        row-strided view."""
        ...

    def write_kv(
        self,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """``AttentionBackend.write_kv`` in one call: k, v (T, KVH, D), rows possibly strided,
        stored at ``slots`` (T,) of the pools."""
        ...


def decode_kernels() -> DecodeKernels | None:
    """The compiled kernels, or None (the build failed: a warning says why)."""
    module = build_extension(SOURCES, "the CPU attention kernels")
    return None if module is None else cast(DecodeKernels, module)


@dataclass(frozen=True)
class PrefillBatch:
    """The step's prefill chunks: chunk ``s`` has query rows ``[q_start[s], + q_len[s])`` and
    attends causally to positions ``[0, context_len[s])`` of its blocks ``block_ids[s]``."""

    block_ids: torch.Tensor  # (S, NB) padded with 0
    q_start: torch.Tensor  # (S,)
    q_len: torch.Tensor  # (S,)
    context_len: torch.Tensor  # (S,)


@dataclass(frozen=True)
class DecodeLevels:
    """Shared prefix levels read by the rows of a decode batch besides their own blocks: level
    ``l`` holds ``lengths[l]`` positions (whole blocks) from position ``starts[l]`` in
    ``block_ids[l]`` and is read by the batch's rows ``rows[row_ptr[l]:row_ptr[l + 1]]``
    (indices into the batch, not the step), whose query positions are ``positions``."""

    block_ids: torch.Tensor  # (L, NBL) padded with 0
    lengths: torch.Tensor  # (L,)
    row_ptr: torch.Tensor  # (L + 1,)
    rows: torch.Tensor  # (R,)
    starts: torch.Tensor  # (L,)
    positions: torch.Tensor  # (B,) query position of each row of the decode batch


@dataclass(frozen=True)
class CpuMetadata:
    """One step as the CPU backend reads it in every layer."""

    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    prefill: PrefillBatch | None
    decode: DecodeBatch | None  # each row's own blocks (after its levels)
    levels: DecodeLevels | None


def decode_levels(step: AttentionStep, decode: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of ``DecodeLevels`` (keys ``l_`` + field) for the step's levels as read by
    its decode rows ``decode`` (indices into the step's sequences, in decode-batch order):
    nothing when no level has one."""
    batch_row = np.full(step.num_seqs, -1, dtype=np.int64)
    batch_row[decode] = np.arange(len(decode))
    tables, lengths, starts, row_ptr, rows = [], [], [], [0], []
    for lvl in step.levels:
        below = batch_row[lvl.first_seq : lvl.first_seq + lvl.num_seqs]
        read_by = below[below >= 0]
        if len(read_by):
            tables.append(lvl.block_ids)
            lengths.append(lvl.end - lvl.start)
            starts.append(lvl.start)
            rows.append(read_by)
            row_ptr.append(row_ptr[-1] + len(read_by))
    if not tables:
        return {}
    return {
        "l_block_ids": padded_rows(tables),
        "l_lengths": np.array(lengths, dtype=np.int64),
        "l_row_ptr": np.array(row_ptr, dtype=np.int64),
        "l_rows": np.concatenate(rows),
        "l_starts": np.array(starts, dtype=np.int64),
        "l_positions": step.context_len[decode] - 1,
    }


class CpuBackend(AttentionBackend):
    """Every row through the compiled kernels, K/V read in place from the paged pool.

    A prefill chunk attends causally to its whole context (its shared prefix included: the
    chunk's FLOPs are the same either way, and the kernel already loads each K/V element once
    for 16 query heads). A decode row reads its own blocks through ``paged_decode`` and each
    prefix level above it through ``attend_prefix_levels``, which loads the level's K/V once for
    the query heads of all the level's rows.
    """

    shares_prefix = True
    # Below this, rows reread a short prefix from cache about as fast as the level path reads
    # it once (bench: levels of 2 blocks break even, 4 gain 10%, 8 gain 20%).
    min_shared_prefix = 128

    def __init__(
        self, cache: KVCache, num_heads: int, scale: float, kernels: DecodeKernels
    ) -> None:
        super().__init__(cache, num_heads, scale)
        self.kernels = kernels
        self.no_sinks = torch.empty(0, dtype=torch.float32)

    def stage(self, step: AttentionStep) -> Staged[CpuMetadata]:
        arrays = {"slots": slot_mapping(step)}
        single = step.q_len == 1
        prefill, decode = np.flatnonzero(~single), np.flatnonzero(single)
        if len(prefill):
            # A chunk attends its whole context, shared prefix included (see the class).
            arrays["p_tables"] = step.full_tables(prefill).astype(np.int64)
            for key in ("q_start", "q_len", "context_len"):
                arrays[f"p_{key}"] = getattr(step, key)[prefill]
        plan = ContextPlan.build(step, decode, False, arrays)  # own blocks of each row
        if step.levels:
            arrays |= decode_levels(step, decode)

        def build(t: dict[str, torch.Tensor]) -> CpuMetadata:
            batch = None
            if len(prefill):
                batch = PrefillBatch(
                    t["p_tables"], t["p_q_start"], t["p_q_len"], t["p_context_len"]
                )
            levels = None
            if "l_rows" in t:
                levels = DecodeLevels(
                    *(t[f"l_{key}"] for key in ("block_ids", "lengths", "row_ptr", "rows")),
                    t["l_starts"],
                    t["l_positions"],
                )
            return CpuMetadata(t["slots"], batch, plan.tensors(t)[1], levels)

        return Staged(arrays, build)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        if self.cache.value_in_key:  # K alone (MLA's latent): one index copy
            super().write_kv(layer, k, v, slots)
        else:
            self.kernels.write_kv(self.cache.k[layer], self.cache.v[layer], slots, k, v)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: CpuMetadata,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor:
        self.write_kv(layer, k, v, meta.slot_mapping)
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        d = meta.decode
        if meta.prefill is None and d is not None:
            # Every row is a decode row, in row order: no gather of the queries, no scatter.
            return self.decode(q, k_pool, v_pool, d, meta.levels, attn)
        out = q.new_empty(*q.shape[:2], v_pool.shape[-1])  # (T, H, Dv)
        if meta.prefill is not None:
            p = meta.prefill
            self.kernels.prefill_attention(
                q, k_pool, v_pool, out, p.block_ids, p.q_start, p.q_len, p.context_len,
                self.cache.block_size, self.scale, *kernel_options(attn),
                self.no_sinks if attn.sinks is None else attn.sinks,
            )  # fmt: skip
        if d is not None:
            out[d.rows] = self.decode(q[d.rows], k_pool, v_pool, d, meta.levels, attn)
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        d: DecodeBatch,
        levels: DecodeLevels | None,
        attn: LayerAttention,
    ) -> torch.Tensor:
        """The decode rows' queries q (B, H, D), rows possibly strided -> their attention
        (B, H, Dv) contiguous."""
        bs, scale, options = self.cache.block_size, self.scale, kernel_options(attn)
        out, lse = self.kernels.paged_decode(
            q, k_pool, v_pool, d.block_ids, d.lengths, bs, scale, *options
        )
        if levels is not None:
            self.kernels.attend_prefix_levels(
                q, k_pool, v_pool, out, lse, levels.block_ids, levels.lengths, levels.row_ptr,
                levels.rows, bs, scale, levels.starts, levels.positions, *options,
            )  # fmt: skip
        return with_sinks(out, lse, attn.sinks)


def kernel_options(attn: LayerAttention) -> tuple[int, float]:
    """A layer's window and soft-cap as the kernels take them: (window, softcap), 0 for off."""
    return attn.window or 0, attn.softcap or 0.0
