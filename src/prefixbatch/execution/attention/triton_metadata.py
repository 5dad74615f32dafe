"""What the Triton attention kernels read for one step, built once from an ``AttentionStep``.

Every array is made with numpy array operations on the host (no loop over sequences), packed
into one int32 array that travels to the device with the rest of the step's inputs (one pinned
buffer, one ``non_blocking`` copy on CUDA: ``execution/upload.py``); the fields are views of it.
The kernels are launched over two work lists built here, so no program searches for its sequence
or level:

- prefix tiles: ``(level, first row)`` pairs, one per ``prefix_rows`` query rows of a level, so a
  level's KV is read once per tile of the rows below it (Hydragen, BatchLLM);
- own tiles: ``(sequence, first query)`` pairs, one per ``own_rows`` new tokens of a sequence,
  prefill chunks and decode rows alike (vLLM's unified Triton attention tiles the same way).

The GQA query heads of one KV head are packed into the kernels' M dimension, so a tile of ``n``
rows fills ``n * group_size`` rows of M; the rows per tile are chosen from ``group_size`` so
that this stays near ``OWN_TILE_M`` / ``PREFIX_TILE_M``.

For CUDA graphs, ``build(..., shape=MetadataShape(...))`` pads every array to fixed sizes (one
shape per batch-size bucket): the kernels' grids and the partial buffer then depend only on the
shape, and a captured step is refreshed with one device copy (``update_from``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..upload import Staged, upload
from .backend import padded_rows, query_positions, slot_mapping
from .resident_table import ResidentTable
from .step import AttentionStep

# Packed (query row x GQA head) rows a tile aims for; untuned starting points.
OWN_TILE_M = 32
PREFIX_TILE_M = 64
_SEQ_KEYS = ("q_start", "q_len", "context_len", "shared_len", "num_levels", "table_row")
_LEVEL_KEYS = ("level_row_start", "level_row_end", "level_length", "level_start", "level_row")


@dataclass(frozen=True)
class MetadataShape:
    """Fixed sizes of padded metadata (e.g. one CUDA-graph bucket); a step fits when none of its
    counts exceeds these. ``partials`` bounds the sum of the levels' row counts."""

    rows: int
    seqs: int
    max_blocks: int
    levels: int
    max_level_blocks: int
    max_depth: int
    own_tiles: int
    prefix_tiles: int
    partials: int


@dataclass(frozen=True)
class TritonMetadata:
    """Device tensors (int32) for one step, and the sizes the launcher needs.

    Per sequence, shape (S,): ``q_start``, ``q_len``, ``context_len``, ``shared_len`` (where its
    own KV starts), ``num_levels`` (prefix levels above it, depths ``0..num_levels - 1``),
    ``table_row``. Row ``table_row[i]`` of ``block_table`` (R, W) holds sequence ``i``'s own
    blocks, from position ``shared_len`` on (column ``j``: positions ``shared_len + j *
    block_size ..``), padded with 0: the runner's persistent table itself, kept on the device by
    row diffs (``resident_table.py``), or the step's rows gathered (CUDA-graph buckets, steps
    made from records). ``seq_levels`` (S, max(1, max_depth)) holds
    the level id at each depth (-1 past ``num_levels``). ``slot_mapping`` (T,) is the KV slot of
    each new token, ``row_position`` (T,) its position. Per level, shape (L,):
    ``level_row_start``, ``level_row_end``, ``level_length`` (positions, whole blocks),
    ``level_start`` (the position of its first), ``level_out``
    (first row of the level's partials in the (num_partials, H, D) buffer), ``level_row``: the
    row of ``level_blocks`` (LR, LW) holding its blocks, padded with 0 (the runner's persistent
    prefix tables on the device, or the step's levels gathered, as for ``block_table``). Work
    lists: ``own_tile_seq``, ``own_tile_q0`` (NT,);
    ``prefix_tile_level``, ``prefix_tile_row0`` (NP,).
    """

    q_start: torch.Tensor
    q_len: torch.Tensor
    context_len: torch.Tensor
    shared_len: torch.Tensor
    num_levels: torch.Tensor
    table_row: torch.Tensor
    block_table: torch.Tensor
    seq_levels: torch.Tensor
    slot_mapping: torch.Tensor
    row_position: torch.Tensor
    level_row_start: torch.Tensor
    level_row_end: torch.Tensor
    level_length: torch.Tensor
    level_start: torch.Tensor
    level_out: torch.Tensor
    level_row: torch.Tensor
    level_blocks: torch.Tensor
    own_tile_seq: torch.Tensor
    own_tile_q0: torch.Tensor
    prefix_tile_level: torch.Tensor
    prefix_tile_row0: torch.Tensor
    flat: torch.Tensor  # the device buffer every field above is a view of (resident tables aside)
    num_rows: int
    block_size: int
    own_rows: int  # query rows per own tile
    prefix_rows: int  # query rows per prefix tile
    num_partials: int  # rows of the prefix partial buffer (sum of the levels' row counts)
    padded: bool = False  # built with a ``MetadataShape`` (padding tiles after the real ones)

    @classmethod
    def stage(
        cls,
        step: AttentionStep,
        group_size: int = 1,
        shape: MetadataShape | None = None,
        resident: tuple[ResidentTable, ResidentTable] | None = None,
    ) -> Staged[TritonMetadata]:
        """Lay out ``step`` for the kernels: every array built with array operations (no loop
        over sequences) and packed into one int32 host array, and how to make the metadata from
        its device copy. ``group_size`` (query heads per KV head) only sizes the tiles; any
        value gives correct results. With ``shape``, every array is padded to it (padding rows
        write no KV, padding tiles do no work; q must then have ``shape.rows`` rows, and the
        output rows past ``step.num_rows`` are undefined). With ``resident`` (the device copies
        of the step's block tables and prefix tables) and a step that has them
        (``step.versions``), the kernels read those copies in place, brought up to date by the
        rows written since (no padding then: a CUDA-graph bucket reads its own fixed buffers).

        Raises ValueError when the rows do not tile ``[0, num_rows)`` in sequence order, a
        sequence's levels do not cover ``[0, shared_len)`` with depths ``0..n-1``, or the step
        does not fit ``shape``.
        """
        bs = step.block_size
        q_start, q_len = step.q_start.astype(np.int32), step.q_len.astype(np.int32)
        ctx, shared = step.context_len.astype(np.int32), step.shared_len.astype(np.int32)
        if (q_start != _exclusive_cumsum(q_len)).any() or q_len.sum() != step.num_rows:
            raise ValueError("sequence rows must tile [0, num_rows) in order")
        if (q_len < 1).any() or (ctx - q_len < shared).any() or (shared % bs).any():
            raise ValueError("each sequence needs q_len >= 1 and new tokens after shared_len")
        if (step.tables.shape[1] * bs < ctx - shared).any():
            raise ValueError("a block table is shorter than its context")
        own_rows = max(1, OWN_TILE_M // group_size)
        prefix_rows = max(1, PREFIX_TILE_M // group_size)
        arrays = {
            "q_start": q_start,
            "q_len": q_len,
            "context_len": ctx,
            "shared_len": shared,
            "slot_mapping": slot_mapping(step).astype(np.int32),
            "row_position": query_positions(step)[1].astype(np.int32),
            **_level_arrays(step, q_start, q_len, shared),
            **_tiles("own_tile_seq", "own_tile_q0", q_len, own_rows, np.zeros_like(q_len)),
        }
        row_start = arrays["level_row_start"]
        rows = arrays["level_row_end"] - row_start
        arrays.update(_tiles("prefix_tile_level", "prefix_tile_row0", rows, prefix_rows, row_start))
        tables, table_arrays = _tables(step, resident if shape is None else None)
        arrays |= tables
        num_rows, num_partials = step.num_rows, int(rows.sum())
        if shape is not None:
            if num_partials > shape.partials:
                raise ValueError(f"{num_partials} partial rows do not fit {shape}")
            arrays, num_rows, num_partials = _pad(arrays, shape), shape.rows, shape.partials
        layout = [(key, a.shape) for key, a in arrays.items()]
        flat = np.concatenate([a.ravel() for a in arrays.values()]).astype(np.int32, copy=False)
        extra = {k: a for staged, _ in table_arrays.values() for k, a in staged.items()}

        def build(t: dict[str, torch.Tensor]) -> TritonMetadata:
            views = _views(t["triton"], layout)
            views |= {key: apply(t) for key, (_, apply) in table_arrays.items()}
            return cls(
                **views,
                num_rows=num_rows,
                block_size=bs,
                own_rows=own_rows,
                prefix_rows=prefix_rows,
                num_partials=num_partials,
                padded=shape is not None,
            )

        return Staged({"triton": flat, **extra}, build)

    @classmethod
    def build(
        cls,
        step: AttentionStep,
        device: torch.device,
        group_size: int = 1,
        shape: MetadataShape | None = None,
    ) -> TritonMetadata:
        """``stage``'s metadata on ``device`` (one host-to-device copy)."""
        staged = cls.stage(step, group_size, shape)
        return staged.build(upload(staged.arrays, device))

    def update_from(self, other: TritonMetadata) -> None:
        """Copy ``other`` (built with the same ``shape`` and ``group_size``) into this
        metadata's buffers in place, one device copy: what a CUDA-graph replay reads.

        Raises ValueError when the layouts differ."""
        sizes = ("num_rows", "block_size", "own_rows", "prefix_rows", "num_partials")
        if self.flat.shape != other.flat.shape or any(
            getattr(self, n) != getattr(other, n) for n in sizes
        ):
            raise ValueError("metadata of different shapes")
        self.flat.copy_(other.flat, non_blocking=True)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return (np.cumsum(x) - x).astype(np.int32)


_Apply = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _tables(
    step: AttentionStep, resident: tuple[ResidentTable, ResidentTable] | None
) -> tuple[dict[str, np.ndarray], dict[str, tuple[dict[str, np.ndarray], _Apply]]]:
    """The tables the kernels read and each sequence's / level's row in them: host arrays for
    the packed buffer (``table_row``, ``level_row``, and the gathered ``block_table`` /
    ``level_blocks`` when not resident), and for each resident table its diff arrays and the
    function that applies them (``ResidentTable.stage``)."""
    levels = step.levels
    versions = step.versions
    resident_levels = step.prefix_tables is not None and all(lvl.table_row >= 0 for lvl in levels)
    if resident is None or versions is None:
        own = step.own_tables()  # positions below shared_len are read through the levels
        arrays = {"table_row": np.arange(step.num_seqs, dtype=np.int32), "block_table": own}
        staged = {}
    else:
        arrays = {"table_row": step.table_rows.astype(np.int32)}
        staged = {
            "block_table": resident[0].stage(step.tables, versions.tables, versions.version, "own")
        }
    if resident is None or versions is None or not resident_levels:
        arrays["level_row"] = np.arange(len(levels), dtype=np.int32)
        arrays["level_blocks"] = padded_rows([lvl.block_ids for lvl in levels], np.int32)
    else:
        assert step.prefix_tables is not None
        arrays["level_row"] = np.array([lvl.table_row for lvl in levels], dtype=np.int32)
        staged["level_blocks"] = resident[1].stage(
            step.prefix_tables, versions.prefix_tables, versions.version, "levels"
        )
    return arrays, staged


def _level_arrays(
    step: AttentionStep, q_start: np.ndarray, q_len: np.ndarray, shared: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-level arrays, ``seq_levels``/``num_levels``, and the checks that levels tile each
    sequence's shared positions (array operations over the levels' sequences)."""
    levels = step.levels
    num_seqs = step.num_seqs
    fields = ("first_seq", "num_seqs", "row_start", "row_end", "start", "end", "depth")
    per = np.array([[getattr(lvl, f) for f in fields] for lvl in levels], dtype=np.int64)
    first, count, row_start, row_end, start, end, depth = per.reshape(-1, len(fields)).T
    last = first + count
    if (count < 1).any() or (last > num_seqs).any():
        raise ValueError("a level's sequences are out of range")
    blocks = np.array([len(lvl.block_ids) for lvl in levels], dtype=np.int64)
    if len(levels) and (
        (q_start[first] != row_start).any()
        or (q_start[last - 1] + q_len[last - 1] != row_end).any()
        or (blocks * step.block_size != end - start).any()
    ):
        raise ValueError("a level's rows or blocks disagree with its sequences")
    # One entry per (level, sequence below it).
    seq = (
        np.repeat(first, count)
        + np.arange(count.sum())
        - np.repeat(_exclusive_cumsum(count), count)
    )
    level_of = np.repeat(np.arange(len(levels)), count)
    seq_levels = np.full((num_seqs, max(1, step.max_depth)), -1, dtype=np.int32)
    flat = seq * seq_levels.shape[1] + np.repeat(depth, count)
    if np.bincount(flat, minlength=seq_levels.size).max(initial=0) > 1:
        raise ValueError("two levels at one depth over one sequence")
    seq_levels.ravel()[flat] = level_of
    covered = np.bincount(seq, weights=np.repeat(end - start, count), minlength=num_seqs)
    num_levels = (seq_levels >= 0).sum(1).astype(np.int32)
    depth_ok = (seq_levels >= 0) == (np.arange(seq_levels.shape[1]) < num_levels[:, None])
    if (covered != shared).any() or not depth_ok.all():
        raise ValueError("levels must cover [0, shared_len) of each sequence, depths 0..n-1")
    return {
        "num_levels": num_levels,
        "seq_levels": seq_levels,
        "level_row_start": row_start.astype(np.int32),
        "level_row_end": row_end.astype(np.int32),
        "level_length": (end - start).astype(np.int32),
        "level_start": start.astype(np.int32),
        "level_out": _exclusive_cumsum(row_end - row_start),
    }


def _tiles(
    owner_key: str, first_key: str, counts: np.ndarray, per_tile: int, base: np.ndarray
) -> dict[str, np.ndarray]:
    """Split ``counts[i]`` rows of owner ``i`` into tiles of ``per_tile``: the owner of each tile
    and its first row (``base[i]`` + a multiple of ``per_tile``)."""
    n = -(-counts // per_tile)
    owner = np.repeat(np.arange(len(counts)), n)
    k = np.arange(len(owner)) - np.repeat(_exclusive_cumsum(n), n)
    return {
        owner_key: owner.astype(np.int32),
        first_key: (base[owner] + k * per_tile).astype(np.int32),
    }


def _pad(arrays: dict[str, np.ndarray], shape: MetadataShape) -> dict[str, np.ndarray]:
    """Every array padded to ``shape``, plus one null sequence (no rows, no context) and one
    null level (no rows, no KV) past the last, which the padding tiles point at."""
    depth = max(1, shape.max_depth)
    # key -> (room for the step, fill); sequence and level arrays get one null entry more.
    room: dict[str, tuple[tuple[int, ...], int]] = {
        **{key: ((shape.seqs,), 0) for key in _SEQ_KEYS},
        "block_table": ((shape.seqs, shape.max_blocks), 0),
        "seq_levels": ((shape.seqs, depth), -1),
        **{key: ((shape.levels,), 0) for key in (*_LEVEL_KEYS, "level_out")},
        "level_blocks": ((shape.levels, shape.max_level_blocks), 0),
    }
    exact: dict[str, tuple[tuple[int, ...], int]] = {
        "slot_mapping": ((shape.rows,), -1),
        "row_position": ((shape.rows,), 0),
        "own_tile_seq": ((shape.own_tiles,), shape.seqs),
        "own_tile_q0": ((shape.own_tiles,), 0),
        "prefix_tile_level": ((shape.prefix_tiles,), shape.levels),
        "prefix_tile_row0": ((shape.prefix_tiles,), 0),
    }
    out = {}
    for key, a in arrays.items():
        fits, fill = room.get(key) or exact[key]
        if any(n > t for n, t in zip(a.shape, fits)):
            raise ValueError(f"{key} {a.shape} does not fit {shape}")
        target = (fits[0] + 1, *fits[1:]) if key in room else fits
        out[key] = np.full(target, fill, dtype=np.int32)
        out[key][tuple(slice(0, n) for n in a.shape)] = a
    return out


def _views(
    flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """The fields of the packed buffer ``flat`` (int32, on the device) as views with their
    shapes, plus ``flat`` itself."""
    out, offset = {"flat": flat}, 0
    for key, shape in layout:
        size = int(np.prod(shape))
        out[key] = flat[offset : offset + size].view(shape)
        offset += size
    return out
