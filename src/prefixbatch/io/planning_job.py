"""``prefixbatch plan``: tokenize a batch file and report the plan, loading no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import EngineConfig
from ..execution.kv_cache import kv_pool_blocks
from ..loading.builder import read_model_config
from ..loading.model_source import resolve_model
from ..planning.plan import make_plan
from ..planning.report import format_report, plan_report
from ..tokenizer import Tokenizer
from .batch_file import BatchRequest
from .job import read_items, tokenize


def plan_job(
    config: EngineConfig, path: Path, default_max_tokens: int
) -> tuple[dict[str, Any], str]:
    items = read_items(path, default_max_tokens)
    source = resolve_model(config.model)
    cfg = read_model_config(source)
    tokenized, errors = tokenize(
        Tokenizer(source.path), [i for i in items if isinstance(i, BatchRequest)]
    )
    prompts = [ids for _, ids in tokenized]
    plan = make_plan(prompts, [r.params.max_tokens for r, _ in tokenized], config.block_size)
    blocks, _ = kv_pool_blocks(config, cfg)
    report = plan_report(plan, prompts, config.block_size, max(1, blocks))
    report["invalid_lines"] = len(items) - len(tokenized)
    return report, format_report(report) + f"\ninvalid lines:          {report['invalid_lines']}"
