"""The Triton attention backend: paged KV writes and shared-prefix attention in three launches
per layer (KV store, prefix levels, own KV merged with the levels), for any mixed step.

It builds its metadata once per step (``prepare``) and reuses it for every layer (``forward``).
This module imports without triton installed, so ``triton_available`` can be asked anywhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..kv_cache import KVCache
from ..upload import Staged, upload
from .backend import FULL_ATTENTION, AttentionBackend, LayerAttention
from .kv_splits import KVSplits, busy_tiles, choose_splits
from .resident_table import ResidentTable
from .step import AttentionStep, SeqStep
from .triton_metadata import PREFIX_TILE_M, MetadataShape, TritonMetadata


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton importable, or the
    CPU with ``TRITON_INTERPRET=1`` set before triton was imported (the tests' interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def target_programs(device: torch.device) -> int:
    """Programs a decode launch should reach before its KV is split: two per SM on CUDA (one
    program per SM leaves each SM one warp group to hide memory latency with); 0 on the CPU
    (the interpreter runs programs one by one: splitting only adds work)."""
    if device.type != "cuda":
        return 0
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


class TritonBackend(AttentionBackend):
    """Writes a step's new K/V into the paged cache and computes attention for every row, the
    rows below prefix levels reading each level once per tile of rows (see ``triton_kernels``,
    launched by ``triton_launch``).

    ``forward`` gets q (T, H, D), k (T, KVH, D) and v (T, KVH, Dv) for the flattened step and
    returns (T, H, Dv) in q's dtype: an exact softmax over each row's whole context (levels,
    then its own positions ``[shared_len, context_len)`` causally), accumulated in fp32. A
    value kept in the key (MLA's compressed cache) is read from the K pool; the key's lanes
    past the value's are a second dot product (``triton_kernels``).
    """

    shares_prefix = True  # the runner may describe prefix-group members as levels + own KV

    def __init__(self, cache: KVCache, num_heads: int, scale: float) -> None:
        # Imported here so that this module, and triton_available, load without triton.
        from . import triton_launch

        super().__init__(cache, num_heads, scale)
        self._kernels = triton_launch
        # query heads one program packs (all of a KV head's, up to 16: MLA splits its 16-128)
        self.group_size = triton_launch.heads_per_program(num_heads // cache.k.shape[2])
        self.head_programs = num_heads // self.group_size  # programs per tile, all KV heads
        # Split-KV when a step's grid would underfill the device (kv_splits.py); tests raise it
        # to split on the CPU.
        self.target_programs = target_programs(cache.k.device)
        # Device copies of the runner's block tables and prefix tables, kept by row diffs.
        device = cache.k.device
        self.resident = (ResidentTable(device), ResidentTable(device))

    def stage(
        self, step: AttentionStep, shape: MetadataShape | None = None
    ) -> Staged[TritonMetadata]:
        """The step's metadata as one host array (``TritonMetadata.stage``), reading the
        block tables in their device copies (``resident``) when the step has persistent ones;
        padded to ``shape`` for a CUDA-graph bucket (its own tables, gathered)."""
        return TritonMetadata.stage(step, self.group_size, shape, self.resident)

    def prepare(self, step: AttentionStep, shape: MetadataShape | None = None) -> TritonMetadata:
        """``stage``'s metadata on the cache's device (one host-to-device copy)."""
        staged = self.stage(step, shape)
        return staged.build(upload(staged.arrays, self.cache.k.device))

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: TritonMetadata,
        attn: LayerAttention = FULL_ATTENTION,
    ) -> torch.Tensor:
        """Attention of layer ``layer`` for the step ``metadata`` was prepared for."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        store_v = not self.cache.value_in_key
        self._kernels.write_kv(k, v, k_pool, v_pool, metadata.slot_mapping, store_v)
        splits = self.splits(metadata)
        return self._kernels.triton_attention(q, k_pool, v_pool, metadata, self.scale, splits, attn)

    def splits(self, metadata: TritonMetadata) -> KVSplits:
        """How the step's KV is split: a function of sizes only, so a CUDA-graph bucket (fixed
        padded sizes) always gets the same splits."""
        rows, padded = metadata.num_rows, metadata.padded
        return choose_splits(
            busy_tiles(metadata.prefix_tile_level.numel(), rows, metadata.prefix_rows, padded),
            busy_tiles(metadata.own_tile_seq.numel(), rows, 1, padded),
            self.head_programs,
            self.target_programs,
        )

    # -- CUDA-graph hooks (execution/cuda_graphs.GraphMetadataHooks) --------------------------
    def set_graph_limits(self, max_blocks_per_seq: int, max_depth: int = 4) -> None:
        """Bounds of a captured decode step: the longest block table (the model's context) and
        the deepest prefix nesting. A step beyond them runs eagerly."""
        self._graph_limits = (max_blocks_per_seq, max_depth)

    def graph_shape(self, bucket: int) -> MetadataShape:
        """Fixed metadata sizes of a decode step of ``bucket`` rows (one per sequence)."""
        max_blocks, depth = self._graph_limits
        partials = bucket * depth  # each row reads at most ``depth`` levels
        levels = partials  # at most one new level per row and depth
        prefix_rows = max(1, PREFIX_TILE_M // self.group_size)
        return MetadataShape(
            rows=bucket,
            seqs=bucket,
            max_blocks=max_blocks,
            levels=levels,
            max_level_blocks=max_blocks,
            max_depth=depth,
            own_tiles=bucket,  # one query row per sequence: one tile each
            prefix_tiles=levels + -(-partials // prefix_rows),
            partials=partials,
        )

    def stage_graph(self, step: AttentionStep, bucket: int) -> Staged[TritonMetadata]:
        """A decode step's metadata padded to ``bucket`` (raises ValueError when it does not
        fit the bucket's shape)."""
        return self.stage(step, self.graph_shape(bucket))

    def graph_buffers(self, bucket: int) -> TritonMetadata:
        """Static metadata of a ``bucket``-row decode step, valid as allocated: every row is a
        sequence attending one position of block 0 (used only to capture, before any request
        holds a block)."""
        seqs = [SeqStep(i, 1, 1, (0,)) for i in range(bucket)]
        step = AttentionStep.of(seqs, block_size=self.cache.block_size)
        return self.prepare(step, self.graph_shape(bucket))

    def fill(self, static: TritonMetadata, meta: TritonMetadata, num_rows: int) -> None:
        """Copy a step's bucket-padded metadata (``stage_graph``) into the static buffers: its
        padding rows write no KV and its padding tiles do no work."""
        del num_rows  # the padding is already in ``meta``
        static.update_from(meta)
