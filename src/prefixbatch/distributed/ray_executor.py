"""Run a job on Ray: one engine actor per worker (one GPU each when the cluster has GPUs).

The driver plans the whole batch once, cuts it into chunks of whole prefix groups
(``sharding``), hands a chunk to each idle actor, and yields outputs as chunks finish; the job
writes them, so output and crash-safety are those of a single-process run. An actor that dies
loses only its chunk in flight, which goes back to the queue for the others.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..config import EngineConfig
from ..engine import EngineStats, LLMEngine
from ..errors import RayUnavailableError
from ..loading.limits import EngineLimits
from ..loading.model_source import resolve_model
from ..outputs import Request, RequestOutput
from ..planning.plan import Plan, make_plan
from ..tokenizer import Tokenizer
from .sharding import Unit, make_chunks, plan_units


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
        self, requests: list[Request], plan: Plan | None
    ) -> tuple[list[RequestOutput], EngineStats]:
        """Run a chunk with its share of the driver's plan (None for non-planning policies):
        workers never plan."""
        outputs = list(self.engine.generate(requests, plan))
        return outputs, dataclasses.replace(self.engine.stats)


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
        return f"{len(counts)} workers, chunks {'/'.join(map(str, counts))}, lag {lag}"

    def generate(
        self,
        requests: Iterable[Request],
        plan: Plan | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[RequestOutput]:
        """Run a batch on the workers; ``plan`` is the batch's plan (made here when None: the
        chunks are cut along its groups under every policy). ``should_stop()`` is asked before
        each chunk is handed out: when it says True no more chunks start, and the generator ends
        after the chunks in flight (their outputs are dropped)."""
        requests = list(requests)
        self.stats = EngineStats()
        if not requests:
            return
        if plan is None:
            plan = make_plan(
                [r.prompt_token_ids for r in requests],
                [r.params.max_tokens for r in requests],
                self.config.block_size,
            )
        share_plan = self.config.policy.plans
        queue: deque[list[Unit]] = deque(
            make_chunks(
                plan_units(plan, len(self.actors)), len(self.actors), self.chunks_per_worker
            )
        )
        idle = [w for w in range(len(self.actors)) if w not in self.failed_workers]
        inflight: dict[Any, tuple[int, list[Unit]]] = {}
        ray = self.ray
        while queue or inflight:
            if should_stop is not None and should_stop():
                return
            while queue and idle:
                worker, chunk = idle.pop(0), queue.popleft()
                indices = [i for u in chunk for i in u.requests]
                share = plan.subset(indices) if share_plan else None
                ref = self.actors[worker].generate.remote([requests[i] for i in indices], share)
                inflight[ref] = (worker, chunk)
            if not inflight:
                raise RayUnavailableError("every engine worker has died; the job cannot finish")
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            worker, chunk = inflight.pop(ref)
            try:
                outputs, stats = ray.get(ref)
            except ray.exceptions.RayError:
                self.failed_workers.append(worker)
                queue.appendleft(chunk)  # nothing of it was yielded: run it elsewhere
                continue
            self.stats.add(stats)
            self.done[worker] = self.done.get(worker, 0) + 1
            self.assignments.setdefault(worker, []).extend(u.requests for u in chunk)
            idle.append(worker)
            yield from outputs

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
