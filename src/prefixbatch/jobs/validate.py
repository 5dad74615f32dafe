"""Turn parsed requests into token ids and check each against the model before any compute.

Used by ``prefixbatch run``, ``prefixbatch plan`` and the server alike (so the plan leaves out
what the run would reject); the Python API checks with the same ``EngineLimits.check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..batch_tokenizer import BatchTokenizer
from ..chat.render import ChatSetup
from ..io.batch_file import BatchRequest, LineError
from ..io.embedding_request import EMBEDDINGS_URL
from ..loading.limits import EngineLimits
from ..sampling_params import SamplingParams
from ..scheduling.request_source import CompactRequests

_INT32_MAX = 2**31 - 1
_SLICE = 1 << 24  # token ids compared at a time (no temporary as large as the batch)


def tokenize(
    tokenizer: BatchTokenizer, chat: ChatSetup, items: list[BatchRequest]
) -> list[tuple[BatchRequest, np.ndarray] | LineError]:
    """Token ids per request, in order (chat template for chats, under ``chat``'s template and
    parsers: a chat request comes back with the params and reply format its rendering
    decided; a score pair as the model tokenizes pairs, ``Tokenizer.encode_pairs``); template
    failures and empty prompts are line errors. Texts are encoded in batch calls, each
    repeated piece once."""
    out: list[tuple[BatchRequest, np.ndarray] | LineError] = []
    chats: list[tuple[int, str]] = []
    prompts: list[tuple[int, str]] = []
    pairs: list[tuple[int, tuple[str, str]]] = []
    for req in items:
        k = len(out)
        if req.pair is not None:
            pairs.append((k, req.pair))
            out.append((req, np.zeros(0, np.int32)))
            continue
        if isinstance(req.prompt, list):
            huge = [t for t in req.prompt if t > _INT32_MAX]  # no vocabulary is that large
            if huge:
                problem = f"token id {huge[0]} is outside the model's vocabulary"
                out.append(LineError(req.line, req.custom_id, f"line {req.line}: {problem}"))
            else:
                out.append((req, np.asarray(req.prompt, dtype=np.int32)))
            continue
        if req.is_chat:
            try:
                rendered = chat.render(req.chat(), req.params)
            except Exception as e:  # a template may raise anything (jinja, our checks)
                message = f"line {req.line}: {req.named(str(e))}"
                out.append(LineError(req.line, req.custom_id, message))
                continue
            req = replace(req, params=rendered.params, reply=rendered.reply)
            chats.append((k, rendered.text))
        else:
            prompts.append((k, req.prompt or ""))
        out.append((req, np.zeros(0, np.int32)))
    encoders = (
        (chats, tokenizer.encode_chats),
        (prompts, tokenizer.encode_prompts),
        (pairs, tokenizer.encode_pairs),
    )
    for texts, encode in encoders:
        for (k, _), ids in zip(texts, encode([t for _, t in texts]) if texts else []):  # type: ignore[operator]
            req = out[k][0]  # type: ignore[index]
            out[k] = (req, ids)
    for k, item in enumerate(out):
        if not isinstance(item, LineError) and not len(item[1]):
            req = item[0]
            out[k] = LineError(req.line, req.custom_id, f"line {req.line}: the prompt is empty")
    return out


def _item(req: BatchRequest, params: SamplingParams) -> str | None:
    """The item of a line that a request is, as its errors name it: an embedding input
    (``'input'[k]``, ``'input'`` alone) or a score pair (by its second text: ``'documents'[k]``),
    or None for a request that is its whole line."""
    if params.score is not None:
        return f"'{params.score.fields[1]}'[{req.part}]"
    if req.url == EMBEDDINGS_URL and params.embedding is not None:
        return "'input'" if req.parts == 1 else f"'input'[{req.part}]"
    return None


@dataclass(frozen=True)
class Checked:
    runnable: CompactRequests  # the requests that fit, in input order
    errors: list[LineError]  # one per request that cannot run
    kept: np.ndarray | None = None  # the positions of ``runnable`` in the requests (None: all)


def check(
    requests: CompactRequests,
    limits: EngineLimits,
    origin: Callable[[int], BatchRequest],
    explicit: np.ndarray | None = None,
) -> Checked:
    """Check every request against the model's context, vocabulary and KV pool, and its
    parameters; a request whose ``max_tokens`` was asked for (``explicit``: (n,) bool, by
    position) must also fit it in the context with its prompt (``EngineLimits.check``'s
    ``explicit``; that error wins over the KV pool's).
    ``origin(request id)`` names a failing request's line and custom_id.

    ``EngineLimits`` decides; its checks run once per distinct (length, max_tokens) pair on a
    stand-in prompt of valid ids, once per parameter set, and on the real prompt only for the
    requests something flags (a token outside the vocabulary found in one pass over all ids).
    A line of several items (embedding inputs, score pairs) fails as a whole: one error for its
    failing item, and its other items are left out of the runnable requests."""
    if not len(requests):
        return Checked(requests, [])
    lengths, budgets = requests.lengths, requests.max_tokens()
    set_embeds = np.array([p.embedding is not None for p in requests.param_sets], np.int64)
    embeds = set_embeds[requests.param_ids]
    pairs, pair_of = np.unique(np.stack([lengths, budgets, embeds]), axis=1, return_inverse=True)
    explicit = np.zeros(len(requests), bool) if explicit is None else explicit
    pair_bad = np.array(
        [
            [
                limits.check(np.zeros(n, np.int32), m, given, bool(e)) is not None
                for n, m, e in pairs.T.tolist()
            ]
            for given in (False, True)
        ]
    )  # (2, pairs): as a default max_tokens, as an explicit one
    set_problem = [limits.check_params(p) for p in requests.param_sets]
    flagged = (
        pair_bad[explicit.astype(np.intp), pair_of.ravel()]
        | np.array([p is not None for p in set_problem])[requests.param_ids]
    )
    ids = requests.prompts.ids.view(np.uint32)  # a negative id reads as a huge one
    outside = np.concatenate(
        [
            np.flatnonzero(ids[s : s + _SLICE] >= limits.vocab_size) + s
            for s in range(0, len(ids), _SLICE)
        ]
        or [np.zeros(0, np.int64)]
    )
    if len(outside):  # the prompts that hold those positions
        starts = requests.prompts.starts
        by_start = np.argsort(starts)
        at = by_start[np.maximum(np.searchsorted(starts[by_start], outside, "right") - 1, 0)]
        flagged[at[outside < requests.prompts.ends[at]]] = True
    errors: list[LineError] = []
    siblings: list[int] = []  # request ids of the other items of lines that failed
    for pos in np.flatnonzero(flagged).tolist():
        params = requests.params(pos)
        prompt = requests.prompts[pos]
        embedding = params.embedding is not None
        problem = limits.check(prompt, params.max_tokens, bool(explicit[pos]), embedding)
        if problem or set_problem[requests.param_ids[pos]]:
            req = origin(int(requests.ids[pos]))
            where = _item(req, params)
            if problem and where is not None:  # the prompt's problem: name the line's item
                problem = f"{where}: {problem}"
            problem = req.named(problem or set_problem[requests.param_ids[pos]] or "")
            errors.append(LineError(req.line, req.custom_id, f"line {req.line}: {problem}"))
            first = int(requests.ids[pos]) - req.part  # a line's items have consecutive ids
            siblings += range(first, first + req.parts)
        else:
            flagged[pos] = False
    if siblings:  # a line fails as a whole: its other items are not computed
        flagged |= np.isin(requests.ids, siblings)
    if not flagged.any():
        return Checked(requests, errors)
    kept = np.flatnonzero(~flagged)
    sub = CompactRequests(
        requests.prompts.select(kept), requests.param_sets, requests.param_ids[kept],
        requests.ids[kept],
    )  # fmt: skip
    return Checked(sub, errors, kept)
