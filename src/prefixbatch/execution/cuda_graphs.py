"""Decode steps replayed as CUDA graphs, one per batch-size bucket.

A decode step (one query token per sequence) launches a few hundred small kernels; at batch 128
their launch cost rivals the work. Captured once per bucket (1, 2, 4, ..., max_batch) into static
buffers and replayed, the whole step is one launch. A step of ``n`` rows runs in the smallest
bucket ``>= n``: its token ids and positions are copied into the static buffers and zero-padded,
the attention backend copies its metadata into its static metadata and makes the padding rows
harmless, and the graph replays. Prefill and mixed steps, and decode steps above the largest
bucket, run eagerly. All buckets share one memory pool, captured largest first so the smaller
graphs reuse its blocks (as vLLM's ``CUDAGraphRunner`` and nano-vllm's ``capture_cudagraph`` do;
PyTorch docs, "CUDA Graphs": ``torch.cuda.graph`` with ``pool=``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch

from .attention.step import AttentionStep
from .upload import Staged

M = TypeVar("M")

# forward(input_ids (B,) int64, positions (B,) int64, metadata) -> logits (B, vocab) fp32
Forward = Callable[[torch.Tensor, torch.Tensor, M], torch.Tensor]


@runtime_checkable
class GraphMetadataHooks(Protocol[M]):
    """What an attention backend implements so its decode steps can be captured.

    ``M`` is the backend's own metadata type (what ``prepare`` returns for a step).
    """

    def graph_buffers(self, bucket: int) -> M:
        """Static metadata for a decode step of ``bucket`` rows, allocated once on the device
        with shapes that do not depend on the step (e.g. block tables padded to the longest
        context the engine allows). It must be valid as allocated: the warm-up and the capture
        run the forward on it (rows that attend one position and write KV to a scratch slot)."""
        ...

    def stage_graph(self, step: AttentionStep, bucket: int) -> Staged[M]:
        """A decode step's metadata laid out for ``bucket`` rows (what ``fill`` copies in), as
        host arrays the runner uploads with the step's inputs; raises ValueError when the step
        does not fit the bucket (it then runs eagerly)."""
        ...

    def fill(self, static: M, meta: M, num_rows: int) -> None:
        """Copy a decode step's metadata (``num_rows`` rows, from ``stage_graph``) into
        ``static`` in place (``Tensor.copy_``; never rebind a tensor: the graph reads fixed
        addresses). Rows ``[num_rows, bucket)`` are padding: they must read valid KV and write
        their KV where no sequence reads, and nothing they produce is used."""
        ...


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: (1, 2, 4, ..., max_batch)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
    return tuple(sorted({*sizes, max_batch}))


def bucket_for(num_rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``num_rows`` rows, or None above the largest."""
    return next((b for b in buckets if b >= num_rows), None)


class DecodeGraphRunner(Generic[M]):
    """Runs decode steps of up to ``max_batch`` rows through per-bucket CUDA graphs.

    With ``use_graphs=False`` (the default off CUDA) the same padded static buffers are run
    eagerly: the path tests use to check padding and the hooks without a GPU. Call ``capture``
    once (after the weights and the KV pool exist, under the same dtype and mode as the steps)
    before ``run`` with graphs.
    """

    def __init__(
        self,
        forward: Forward[M],
        hooks: GraphMetadataHooks[M],
        max_batch: int,
        device: torch.device,
        use_graphs: bool | None = None,
    ) -> None:
        self.forward = forward
        self.hooks = hooks
        self.buckets = batch_buckets(max_batch)
        self.device = device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._static: dict[int, M] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    @property
    def captured(self) -> tuple[int, ...]:
        """Buckets with a captured graph."""
        return tuple(sorted(self._graphs))

    def _static_for(self, bucket: int) -> M:
        if bucket not in self._static:
            self._static[bucket] = self.hooks.graph_buffers(bucket)
        return self._static[bucket]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, in one shared memory pool.

        Each bucket first runs once eagerly on a side stream (lazy initialisation, cuBLAS
        workspaces and Triton autotuning must not happen inside a capture).
        """
        if not self.use_graphs:
            raise RuntimeError("capture needs use_graphs=True on a CUDA device")
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            static = self._static_for(bucket)
            ids, pos = self.input_ids[:bucket], self.positions[:bucket]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.forward(ids, pos, static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bucket] = self.forward(ids, pos, static)
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: M) -> torch.Tensor:
        """Logits (n, vocab) of a decode step of n rows (``meta`` from the backend's
        ``prepare``). Through a graph the result is a view of the bucket's static output, valid
        until the next ``run``; above the largest bucket the step runs eagerly."""
        n = input_ids.shape[0]
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            return self.forward(input_ids, positions, meta)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.input_ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        static = self._static_for(bucket)
        self.hooks.fill(static, meta, n)
        if not self.use_graphs:
            return self.forward(self.input_ids[:bucket], self.positions[:bucket], static)[:n]
        if bucket not in self._graphs:
            raise RuntimeError("no CUDA graph captured for this batch size: call capture() first")
        self._graphs[bucket].replay()
        return self._outputs[bucket][:n]
