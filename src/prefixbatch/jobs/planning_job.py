"""``prefixbatch plan``: tokenize a batch file and report the plan, loading no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..batch_tokenizer import BatchTokenizer
from ..chat.render import ChatOptions
from ..config import EngineConfig
from ..execution.kv_memory import kv_pool_blocks
from ..loading.limits import EngineLimits
from ..loading.model_config import read_model_config
from ..loading.model_source import resolve_model
from ..loading.pooling_config import read_pooling_config
from ..loading.score_config import read_score_config, score_head_kind
from ..planning.plan import make_plan
from ..planning.prefix_sort import sort_prompts
from ..planning.report import format_report, plan_report
from ..tokenizer import Tokenizer
from .ingest import ingest
from .job import listed
from .validate import check


def plan_job(
    config: EngineConfig, path: Path, default_max_tokens: int, chat: ChatOptions | None = None
) -> tuple[dict[str, Any], str]:
    """(the report as a JSON-ready dict, the same as text). Lines ``prefixbatch run`` would
    reject (parse errors, token ids outside the vocabulary, too long) are left out, counted in
    ``rejected_lines`` and listed in ``rejected`` (``{"line", "message"}`` each, in line order;
    the text names the first ``LISTED``, then counts the rest). ``chat``: the chat template and
    parsers ``run`` would use."""
    source = resolve_model(config.model)
    cfg = read_model_config(source)
    batch = ingest(
        path, default_max_tokens, lambda: BatchTokenizer(Tokenizer(source.path)), chat=chat
    )
    blocks, _ = kv_pool_blocks(config, cfg)
    scoring = read_score_config(source.path)
    pooling = read_pooling_config(source.path)
    limits = EngineLimits.of(config, cfg, blocks, pooling, scoring, score_head_kind(config, cfg))
    runnable = batch.store.runnable()
    checked = check(runnable, limits, batch.store.info, batch.store.explicit[runnable.ids])
    requests = checked.runnable
    tree = sort_prompts(requests.prompts)
    plan = make_plan(requests.prompts, requests.max_tokens(), config.block_size, tree)
    report = plan_report(plan, requests.prompts, tree, config.block_size, max(1, blocks))
    # one per line: the first failing item of a line of several (embedding inputs, pairs)
    first = {e.line: e for e in reversed([*batch.errors.values(), *checked.errors])}
    rejected = sorted(first.values(), key=lambda e: e.line)
    report["rejected_lines"] = len(rejected)
    report["rejected"] = [{"line": e.line, "message": e.message} for e in rejected]
    text = [
        format_report(report),
        *listed("rejected", [e.message for e in rejected], len(rejected)),
    ]
    return report, "\n".join(text)
