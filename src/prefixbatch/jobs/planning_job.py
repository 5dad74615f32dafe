"""``prefixbatch plan``: tokenize a batch file and report the plan, loading no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat.render import ChatOptions
from ..config import EngineConfig
from ..execution.kv_memory import kv_pool_blocks
from ..io.batch_file import BatchRequest, LineError
from ..loading.limits import EngineLimits
from ..loading.model_config import read_model_config
from ..loading.model_source import resolve_model
from ..planning.plan import make_plan
from ..planning.report import format_report, plan_report
from ..tokenizer import Tokenizer
from .job import listed, read_items
from .validate import validate


def plan_job(
    config: EngineConfig, path: Path, default_max_tokens: int, chat: ChatOptions | None = None
) -> tuple[dict[str, Any], str]:
    """(the report as a JSON-ready dict, the same as text). Lines ``prefixbatch run`` would
    reject (parse errors, token ids outside the vocabulary, too long) are left out, counted in
    ``rejected_lines`` and listed in ``rejected`` (``{"line", "message"}`` each, in line order;
    the text names the first ``LISTED``, then counts the rest). ``chat``: the chat template and
    parsers ``run`` would use."""
    items = read_items(path, default_max_tokens)
    source = resolve_model(config.model)
    cfg = read_model_config(source)
    blocks, _ = kv_pool_blocks(config, cfg)
    limits = EngineLimits.of(config, cfg, blocks)
    checked = validate(
        Tokenizer(source.path), limits, [i for i in items if isinstance(i, BatchRequest)], chat
    )
    prompts = [ids for _, ids in checked.runnable]
    plan = make_plan(prompts, [r.params.max_tokens for r, _ in checked.runnable], config.block_size)
    report = plan_report(plan, prompts, config.block_size, max(1, blocks))
    rejected = sorted(
        [i for i in items if isinstance(i, LineError)] + checked.errors, key=lambda e: e.line
    )
    report["rejected_lines"] = len(rejected)
    report["rejected"] = [{"line": e.line, "message": e.message} for e in rejected]
    text = [
        format_report(report),
        *listed("rejected", [e.message for e in rejected], len(rejected)),
    ]
    return report, "\n".join(text)
