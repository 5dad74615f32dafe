"""The CPU decode-attention kernels (``csrc/paged_decode.cpp``, ``csrc/prefix_levels.cpp``),
compiled on first use into one module.

``paged_decode`` reads each sequence's K/V straight from the paged pool, so a decode step does
not copy every context into a padded batch first (that copy plus SDPA was about a sixth of a
decode step). ``attend_prefix_levels`` reads each shared prefix level once for all the decode
rows below it and merges it into their results by log-sum-exp (cascade attention, after
BatchLLM, Hydragen and FlashInfer). The build (``native_build.py``) happens once per machine and
source version; without a C++ compiler, or with ``kernels="torch"``, the engine keeps the plain
PyTorch path.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Protocol, cast

import torch

from ..kv_cache import KVCache
from ..native_build import build_extension
from .backend import DecodeBatch, DecodeLevels, block_table_array
from .reference import ReferenceBackend, TorchMetadata
from .step import AttentionStep

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "paged_decode.cpp", CSRC / "prefix_levels.cpp")


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, D) against the first ``lengths[b]`` positions held in blocks
        ``block_tables[b]`` (B, NB) int64 of the pools (slots, KVH, D) -> out (B, H, D) and the
        log-sum-exp of the scores, lse (B, H). fp32, contiguous."""
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
    ) -> None:
        """Merges prefix levels (``DecodeLevels``' fields, in order) into ``out`` and ``lse``
        (``paged_decode``'s, over the rows' own blocks), in place."""
        ...


def decode_kernels() -> DecodeKernels | None:
    """The compiled kernels, or None (the build failed: a warning says why)."""
    module = build_extension(SOURCES, "the CPU attention kernels")
    return None if module is None else cast(DecodeKernels, module)


def decode_levels(step: AttentionStep) -> DecodeLevels | None:
    """The step's levels as read by its decode rows (None when no level has one). Row ``j`` of
    the decode batch is the step's ``j``-th sequence with one query row."""
    decode_row: dict[int, int] = {}
    for i, s in enumerate(step.seqs):
        if s.q_len == 1:
            decode_row[i] = len(decode_row)
    tables: list[tuple[int, ...]] = []
    lengths, row_ptr, rows = [], [0], []
    for lvl in step.levels:
        below = range(lvl.first_seq, lvl.first_seq + lvl.num_seqs)
        read_by = [decode_row[i] for i in below if i in decode_row]
        if read_by:
            tables.append(lvl.block_ids)
            lengths.append(lvl.end - lvl.start)
            rows += read_by
            row_ptr.append(len(rows))
    if not tables:
        return None
    padded = block_table_array([replace(step.seqs[0], block_table=t) for t in tables])
    return DecodeLevels(
        torch.from_numpy(padded),
        torch.tensor(lengths, dtype=torch.int64),
        torch.tensor(row_ptr, dtype=torch.int64),
        torch.tensor(rows, dtype=torch.int64),
    )


class NativeDecodeBackend(ReferenceBackend):
    """Decode rows through the compiled kernels, prefill chunks through SDPA's fused CPU kernel.

    A decode row below prefix levels reads its own blocks through ``paged_decode`` and each
    level through ``attend_prefix_levels``, which holds the query heads of all the level's rows
    in vector lanes, so each K/V element of the level is loaded once for all of them. A prefill
    chunk reads its whole context through SDPA: it is bound by its score FLOPs, which a cascade
    split does not reduce (on the CPU its extra ops made prefill steps ~25% slower).
    """

    shares_prefix = True
    # Below this, rows reread a short prefix from cache about as fast as the level path reads
    # it once (bench: levels of 2 blocks break even, 4 gain 10%, 8 gain 20%).
    min_shared_prefix = 128
    decode_mask = False  # the kernel stops at each row's length; no padding to mask

    def __init__(
        self, cache: KVCache, num_heads: int, scale: float, kernels: DecodeKernels
    ) -> None:
        super().__init__(cache, num_heads, scale)
        self.kernels = kernels

    def prepare(self, step: AttentionStep) -> TorchMetadata:
        if not step.levels:
            return super().prepare(step)
        # Prefill chunks read their whole context (shared_len 0); decode rows their own blocks.
        seqs = tuple(s if s.q_len == 1 else replace(s, shared_len=0) for s in step.seqs)
        meta = super().prepare(replace(step, seqs=seqs))
        if meta.decode is None:
            return meta
        return replace(meta, decode=replace(meta.decode, levels=decode_levels(step)))

    def decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, d: DecodeBatch
    ) -> torch.Tensor:
        # pybind calls the profiler would not see; the named range makes them show.
        with torch.profiler.record_function("prefixbatch::paged_decode"):
            q = q.contiguous()
            bs = self.cache.block_size
            out, lse = self.kernels.paged_decode(
                q, k_pool, v_pool, d.block_ids, d.lengths, bs, self.scale
            )
            if d.levels is not None:
                lv = d.levels
                self.kernels.attend_prefix_levels(
                    q, k_pool, v_pool, out, lse, lv.block_ids, lv.lengths, lv.row_ptr, lv.rows,
                    bs, self.scale,
                )  # fmt: skip
        return out
