"""Run a job on Ray: one engine actor per worker (one GPU each when the cluster has GPUs).

The driver plans the whole batch once, cuts it into chunks of whole prefix groups
(``sharding``), and hands each idle actor a chunk as arrays (``CompactRequests.take``: the
chunk's token ids and its distinct parameter sets, no per-request objects) with its share of
the plan. An actor streams its answers back as they finish (a Ray streaming generator, a batch
of outputs at a time) and the driver yields them; the job writes them, so output and
crash-safety are those of a single-process run. An actor that dies loses only what it had not
answered of its chunk, which goes back to the queue for the others.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EngineConfig
from ..engine import EngineStats, LLMEngine
from ..errors import RayUnavailableError
from ..loading.limits import EngineLimits
from ..loading.model_source import resolve_model
from ..outputs import Request, RequestOutput
from ..planning.plan import Plan, make_plan
from ..scheduling.request_source import CompactRequests, RequestSource
from ..tokenizer import Tokenizer
from .sharding import make_chunks, plan_units

# An actor hands back its answers in batches of up to this many, or whatever it has after
# this many seconds.
BATCH_OUTPUTS, BATCH_SECONDS = 64, 1.0


class EngineWorker:
    """The body of a Ray actor: one engine, fed chunks of requests."""

    def __init__(self, config: EngineConfig, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.engine = LLMEngine(config)

    def info(self) -> tuple[EngineLimits, str]:
        return self.engine.limits, self.engine.model_name

    def generate(
        self, requests: CompactRequests, plan: Plan | None
    ) -> Iterator[tuple[list[RequestOutput], EngineStats]]:
        """Run a chunk with its share of the driver's plan (None for non-planning policies):
        workers never plan. Yields batches of outputs as they finish, each with the chunk's
        counters so far; the last batch may be empty."""
        batch: list[RequestOutput] = []
        last = time.monotonic()
        for out in self.engine.generate(requests, plan):
            batch.append(out)
            if len(batch) >= BATCH_OUTPUTS or time.monotonic() - last >= BATCH_SECONDS:
                yield batch, dataclasses.replace(self.engine.stats)
                batch, last = [], time.monotonic()
        yield batch, dataclasses.replace(self.engine.stats)


@dataclass
class _Chunk:
    """A chunk in flight: its worker, its positions in the batch, the ids answered so far and
    the worker's counters for it."""

    worker: int
    positions: np.ndarray
    answered: list[int]
    stats: EngineStats


class RayExecutor:
    """Same interface as ``LLMEngine`` for the job: limits, tokenizer, generate, stats."""

    def __init__(
        self,
        config: EngineConfig,
        workers: int,
        address: str | None = None,
        chunks_per_worker: int = 4,
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise RayUnavailableError(
                "--workers and --ray-address need Ray: pip install 'prefixbatch[ray]'"
            ) from e
        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=max(workers, os.cpu_count() or 1),
                    include_dashboard=False,
                    log_to_driver=False,
                )
        gpus = ray.cluster_resources().get("GPU", 0)
        threads = None if gpus else max(1, (os.cpu_count() or 1) // workers)
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_restarts=0)(EngineWorker)
        self.actors = [actor.remote(config, threads) for _ in range(workers)]
        self.config = config
        self.chunks_per_worker = chunks_per_worker
        try:
            self.limits, self.model_name = ray.get(self.actors[0].info.remote())
        except ray.exceptions.RayError as e:
            raise RayUnavailableError(f"the engine workers failed to start: {e}") from e
        self.tokenizer = Tokenizer(resolve_model(config.model).path)
        self.stats = EngineStats()
        self.assignments: dict[int, list[tuple[int, ...]]] = {}  # worker -> request indices
        self.done: dict[int, int] = {}  # worker -> chunks finished
        self.failed_workers: list[int] = []

    def status(self) -> str:
        if not self.done:
            return ""
        counts = [
            self.done.get(w, 0) for w in range(len(self.actors)) if w not in self.failed_workers
        ]
        lag = max(counts) - min(counts) if counts else 0
        done = ", ".join(map(str, counts))
        return f"{len(counts)} workers, chunks done per worker: {done} (lag {lag})"

    def generate(
        self,
        requests: Iterable[Request] | RequestSource,
        plan: Plan | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[RequestOutput]:
        """Run a batch on the workers; ``plan`` is the batch's plan (made here when None: the
        chunks are cut along its groups under every policy). ``should_stop()`` is asked before
        each output: when it says True no more chunks start, and the generator ends (what the
        chunks in flight still answer is dropped)."""
        source = _compact(requests)
        self.stats = EngineStats()
        if not len(source):
            return
        if plan is None:
            plan = make_plan(source.prompts, source.max_tokens(), self.config.block_size)
        share_plan = self.config.policy.plans
        chunks = make_chunks(
            plan_units(plan, len(self.actors)), len(self.actors), self.chunks_per_worker
        )
        queue: deque[np.ndarray] = deque(np.concatenate([u.requests for u in c]) for c in chunks)
        idle = [w for w in range(len(self.actors)) if w not in self.failed_workers]
        inflight: dict[Any, _Chunk] = {}
        finished = EngineStats()
        ray = self.ray
        while queue or inflight:
            if should_stop is not None and should_stop():
                return
            while queue and idle:
                worker, positions = idle.pop(0), queue.popleft()
                share = plan.subset(positions) if share_plan else None
                call = self.actors[worker].generate.options(num_returns="streaming")
                stream = call.remote(source.take(positions), share)
                inflight[stream] = _Chunk(worker, positions, [], EngineStats())
            if not inflight:
                raise RayUnavailableError("every engine worker has died; the job cannot finish")
            [stream], _ = ray.wait(list(inflight), num_returns=1)
            chunk = inflight[stream]
            try:
                outputs, chunk.stats = ray.get(next(stream))
            except StopIteration:
                del inflight[stream]
                finished.add(chunk.stats)
                self.done[chunk.worker] = self.done.get(chunk.worker, 0) + 1
                self.assignments.setdefault(chunk.worker, []).append(
                    tuple(source.ids[chunk.positions].tolist())
                )
                idle.append(chunk.worker)
                continue
            except ray.exceptions.RayError:
                del inflight[stream]
                self.failed_workers.append(chunk.worker)
                left = ~np.isin(source.ids[chunk.positions], chunk.answered)
                if left.any():  # what it had not answered runs elsewhere
                    queue.appendleft(chunk.positions[left])
                continue
            chunk.answered += [o.index for o in outputs]
            self.stats = dataclasses.replace(finished)
            for c in inflight.values():
                self.stats.add(c.stats)
            yield from outputs
        self.stats = finished

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def _compact(requests: Iterable[Request] | RequestSource) -> CompactRequests:
    """The batch as arrays, to cut into chunks."""
    if isinstance(requests, CompactRequests):
        return requests
    if isinstance(requests, RequestSource):
        return CompactRequests.of([requests.request(i) for i in range(len(requests))])
    return CompactRequests.of(list(requests))
