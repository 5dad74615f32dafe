"""Turn parsed requests into token ids and check each against the model before any compute.

Used by ``prefixbatch run`` and ``prefixbatch plan`` alike (so the plan leaves out what the run
would reject); the Python API checks with the same ``EngineLimits.check``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..chat.render import ChatOptions, ChatSetup
from ..io.batch_file import CHAT_URL, BatchRequest, LineError
from ..loading.limits import EngineLimits
from ..tokenizer import Tokenizer


def tokenize(
    tokenizer: Tokenizer, items: list[BatchRequest], chat: ChatOptions | None = None
) -> tuple[list[tuple[BatchRequest, list[int]]], list[LineError]]:
    """Token ids per request (chat template for chats, under ``chat``'s template and parsers:
    a chat request comes back with the params and reply format its rendering decided);
    template failures and empty prompts are line errors. Texts are encoded in one batched
    call."""
    ok: list[tuple[BatchRequest, list[int]]] = []
    errors: list[LineError] = []
    texts: list[tuple[BatchRequest, str, bool]] = []
    setup = ChatSetup(tokenizer, chat)
    for req in items:
        if isinstance(req.prompt, list):
            ok.append((req, list(req.prompt)))
            continue
        if req.url == CHAT_URL:
            try:
                rendered = setup.render(req.chat(), req.params)
            except Exception as e:  # a template may raise anything (jinja, our checks)
                errors.append(LineError(req.line, req.custom_id, f"line {req.line}: {e}"))
                continue
            req = replace(req, params=rendered.params, reply=rendered.reply)
            texts.append((req, rendered.text, False))
        else:
            texts.append((req, req.prompt or "", True))
    for special in (False, True):
        batch = [(r, t) for r, t, s in texts if s is special]
        if batch:
            ids = tokenizer.encode_batch([t for _, t in batch], add_special_tokens=special)
            ok += [(r, i) for (r, _), i in zip(batch, ids)]
    kept = []
    for req, ids in ok:
        if not ids:
            errors.append(
                LineError(req.line, req.custom_id, f"line {req.line}: the prompt is empty")
            )
        else:
            kept.append((req, ids))
    return kept, errors


@dataclass(frozen=True)
class Validated:
    runnable: list[tuple[BatchRequest, list[int]]]  # with their token ids, in input order
    errors: list[LineError]  # one per request that cannot run
    too_big_for_kv: int  # how many of those the KV pool cannot hold


def validate(
    tokenizer: Tokenizer,
    limits: EngineLimits,
    items: list[BatchRequest],
    chat: ChatOptions | None = None,
) -> Validated:
    """Tokenize (see ``tokenize``) and check every request."""
    tokenized, errors = tokenize(tokenizer, items, chat)
    runnable = []
    too_big = 0
    for req, ids in sorted(tokenized, key=lambda t: t[0].line):
        problem = limits.check(ids, req.params.max_tokens) or limits.check_params(req.params)
        if problem is None and req.max_tokens_given:
            problem = limits.check_context(len(ids), req.params.max_tokens)
        if problem:
            errors.append(LineError(req.line, req.custom_id, f"line {req.line}: {problem}"))
            too_big += not limits.fits_kv(len(ids), req.params.max_tokens)
        else:
            runnable.append((req, ids))
    return Validated(runnable, errors, too_big)
