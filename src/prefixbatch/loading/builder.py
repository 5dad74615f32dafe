"""Load a model once for engines to share: find and read the checkpoint, start its worker.

``load_model(config)`` resolves the checkpoint (``model_source.py``), normalises its config
(``model_config.py``), reads its tokenizer and hands its weights to an execution ``Worker``,
which puts them on the device and owns everything there (KV pool, attention backend, CUDA
graphs, fast paths). The engine, Ray workers and the benchmarks start here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EngineConfig, ModelConfig
from ..execution.score_head import ScoreHead
from ..execution.worker import Worker
from ..tokenizer import Tokenizer
from .limits import EngineLimits
from .model_config import read_model_config
from .model_source import ModelSource, model_name, resolve_model
from .pooling_config import read_pooling_config
from .score_config import read_score_config, score_head_kind, score_token_ids


@dataclass(frozen=True)
class LoadedModel:
    """What an engine is built on; shared by engines that differ only in scheduling policy."""

    config: EngineConfig
    source: ModelSource
    model_config: ModelConfig
    tokenizer: Tokenizer
    worker: Worker
    limits: EngineLimits
    eos_ids: tuple[int, ...]
    name: str  # written into outputs
    score_head: ScoreHead | None = None  # None: the model does not score


def load_model(config: EngineConfig, source: ModelSource | None = None) -> LoadedModel:
    """Load once. Raises ``JobError`` subclasses for a bad model path, an unsupported
    architecture, an unavailable device or backend, a KV budget of no block, or score tokens
    that are not the model's tokens (or are given for a classifier, which has its head)."""
    _ = config.torch_device  # raises DeviceUnavailableError before any loading
    source = source or resolve_model(config.model)
    cfg = read_model_config(source)
    pooling = read_pooling_config(source.path)
    scoring = read_score_config(source.path)
    tokenizer = Tokenizer(source.path)
    kind = score_head_kind(config, cfg)
    tokens = None
    if kind == "tokens" and config.score_tokens is not None:
        tokens = score_token_ids(tokenizer.hf.get_vocab(), config.score_tokens)
    worker = Worker(config, cfg, source.weights())
    eos = [*cfg.eos_token_ids, tokenizer.eos_token_id]
    head = worker.score_head(tokens)
    return LoadedModel(
        config=config,
        source=source,
        model_config=cfg,
        tokenizer=tokenizer,
        worker=worker,
        limits=EngineLimits.of(config, cfg, worker.num_blocks, pooling, scoring, kind),
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        name=model_name(config.model),
        score_head=head,
    )
