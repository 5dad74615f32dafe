"""The Python API: ``LLM(model=...).generate(prompts, SamplingParams(...))``, ``LLM.chat``,
``LLM.embed`` and ``LLM.score``.

Like the CLI, it logs what takes time (loading, conversion, kernel builds) to stderr unless the
application set up logging itself (``logs.py``), and shows progress for calls that run longer
than a second (a bar on a terminal, a line every 10 s otherwise; ``use_tqdm=False`` turns it
off, as in vLLM's ``LLM.generate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from typing import Any

import numpy as np

from .chat.messages import check_messages, check_template_kwargs
from .chat.render import ChatOptions, ChatRequest, ChatSetup, RenderedChat
from .chat.reply import assistant_message
from .chat.tools import parse_tools
from .config import EngineConfig
from .engine import LLMEngine
from .io.progress import PlannedWork, Progress
from .io.score_request import score_pairs
from .loading.model_source import DEFAULT_MODEL_NAME
from .logs import log_to_stderr_unless_configured
from .outputs import CompletionOutput, Request, RequestOutput
from .planning.plan import make_plan
from .pooling import EmbeddingParams
from .sampling_params import SamplingParams
from .scoring import ScoreParams

Prompt = str | list[int]
PROGRESS_AFTER_S = 1.0  # a call shows progress once it has run this long

log = logging.getLogger(__name__)


class LLM:
    """An offline engine. Keyword arguments are ``EngineConfig`` fields (``kv_cache_memory``
    also accepts strings such as ``"512MiB"``)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from .config import parse_memory

        log_to_stderr_unless_configured()
        if isinstance(kwargs.get("kv_cache_memory"), str):
            kwargs["kv_cache_memory"] = parse_memory(kwargs["kv_cache_memory"])
        start = time.monotonic()
        log.info("loading the model (%s)", model or f"default: {DEFAULT_MODEL_NAME}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        log.info("model loaded after %.1fs", time.monotonic() - start)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def _from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in prompt order. A prompt is text or a list of token ids; ``params`` is one
        SamplingParams for all or one per prompt. Raises ValueError for a params list of another
        length or a prompt that cannot run (token ids outside the vocabulary, too long). A
        request that fails while it runs comes back with ``RequestOutput.error`` set; the others
        are not affected. ``prompt + max_tokens`` beyond the model's context is cut there
        (``finish_reason`` ``"length"``), as vLLM's ``LLM`` does. ``use_tqdm``: show progress
        once the call has run a second."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return self._run(ids, params, use_tqdm)

    def chat(
        self,
        conversations: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "auto",
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the chat template.
        ``developer`` messages are system messages; content may be a list of text parts;
        histories may hold assistant ``tool_calls`` and ``tool`` results.
        ``continue_final_message=True, add_generation_prompt=False`` makes the answer continue
        a final assistant message (vLLM's ``LLM.chat`` options).

        ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are OpenAI's (``"required"`` or a
        named function constrains the answer to valid calls), ``chat_template_kwargs`` extra
        template variables (e.g. ``{"enable_thinking": False}``), ``chat_template`` a template
        file's path or a template's text, used instead of the model's (as
        ``--chat-template``); the parsers are ``"auto"`` (from the template), ``"none"`` or a
        name (``chat.tool_parsers``, ``chat.reasoning``). Each choice's ``message`` holds the
        answer split into content, ``reasoning_content`` and ``tool_calls`` (its
        ``finish_reason`` is ``"tool_calls"`` when it called a tool).

        Raises ValueError as ``generate`` does, for bad tools or messages, a ``chat_template``
        that is neither a file nor a template's text, or when the template cannot render a
        conversation (or its tools). ``use_tqdm`` as in ``generate``."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        setup = ChatSetup(
            self.tokenizer, ChatOptions(chat_template, tool_call_parser, reasoning_parser)
        )
        tool_request = parse_tools(tools, tool_choice, parallel_tool_calls)
        kwargs = check_template_kwargs(chat_template_kwargs)
        rendered = []
        for i, (conversation, sp) in enumerate(
            zip(conversations, _params_list(params, len(conversations)))
        ):
            try:
                request = ChatRequest(
                    check_messages(conversation),
                    tool_request,
                    kwargs,
                    add_generation_prompt,
                    continue_final_message,
                )
                rendered.append(setup.render(request, sp))
            except ValueError as e:
                raise ValueError(f"conversation {i}: {e}") from e
        outs = self._run(
            [self.tokenizer.encode_text(r.text) for r in rendered],
            [r.params for r in rendered],
            use_tqdm,
        )
        return [
            replace(
                out, outputs=[_with_message(out.index, c, rendered[out.index]) for c in out.outputs]
            )
            for out in outs
        ]

    def embed(
        self,
        inputs: Prompt | Sequence[Prompt],
        dimensions: int | None = None,
        use_tqdm: bool = True,
    ) -> list[np.ndarray]:
        """Embeddings of texts or token-id lists, in input order: each (dimensions,) float32,
        pooled as the model's files say (``loading/pooling_config.py``: last token or mean,
        L2-normalised), cut to ``dimensions`` and normalised again for a Matryoshka model.
        Prompts run prefill-only on the same engine and shared prefixes are computed once.
        Raises ValueError for an input that cannot run (empty, too long, token ids outside the
        vocabulary) or ``dimensions`` the model does not support, and RuntimeError naming the
        input whose request failed while it ran."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in inputs]
        params = SamplingParams(max_tokens=1, embedding=EmbeddingParams(dimensions))
        outputs = self._run(ids, params, use_tqdm)
        failed = [o for o in outputs if o.embedding is None]
        if failed:
            raise RuntimeError(f"input {failed[0].index}: {failed[0].error}")
        return [o.embedding for o in outputs if o.embedding is not None]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        use_activation: bool = True,
        use_tqdm: bool = True,
    ) -> list[float]:
        """Scores of text pairs, as vLLM's ``LLM.score``: ``data_1`` and ``data_2`` are a text
        or lists of texts, paired 1-to-1, 1-to-N (one query, many documents) or N-to-N; one
        score per pair, in order. A pair runs as one prompt, tokenized as the model tokenizes
        pairs (``Tokenizer.encode_pairs``), prefill only; the pairs of one query share its
        tokens, computed once. The score is the model's score head's logit through its
        activation (sigmoid unless the checkpoint says otherwise; ``use_activation=False``:
        the raw logit): a classifier checkpoint's ``score`` head, or the score tokens' p(true)
        (``EngineConfig.score_tokens``). Raises ValueError for empty or mismatched lists, a
        pair that cannot run (too long) or a model that cannot score, and RuntimeError naming
        the pair whose request failed while it ran."""
        names = ("data_1", "data_2")
        pairs = score_pairs(
            data_1 if isinstance(data_1, str) else list(data_1),
            data_2 if isinstance(data_2, str) else list(data_2),
            names,
        )
        ids = self.tokenizer.encode_pairs(pairs)
        score = ScoreParams(use_activation, names)
        params = SamplingParams(max_tokens=1, embedding=EmbeddingParams(), score=score)
        outputs = self._run(ids, params, use_tqdm)
        failed = [o for o in outputs if o.score is None]
        if failed:
            raise RuntimeError(f"pair {failed[0].index}: {failed[0].error}")
        return [o.score for o in outputs if o.score is not None]

    def _run(
        self,
        ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        """Raises ValueError when ``params`` is a list of another length than the prompts, or
        a prompt cannot run (token ids outside the vocabulary, too long, a logit_bias token
        outside it, a grammar that does not compile)."""
        params = _params_list(params, len(ids))
        for i, (p, sp) in enumerate(zip(ids, params)):
            limits = self.engine.limits
            problem = limits.check(p, sp.max_tokens, embedding=sp.embedding is not None)
            problem = problem or limits.check_params(sp)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        requests = [Request(i, p, sp) for i, (p, sp) in enumerate(zip(ids, params))]
        plan = None
        if self.engine.config.policy.plans:  # the API plans the batch; the engine consumes it
            plan = make_plan(ids, [sp.max_tokens for sp in params], self.engine.config.block_size)
        planned = PlannedWork(  # the ETA prices the work left, as a job's does
            plan.computed_prefill_tokens if plan is not None else sum(map(len, ids)),
            sum(sp.max_tokens * sp.sampled_choices for sp in params),
        )
        progress = Progress(
            len(requests), quiet=not use_tqdm, after_s=PROGRESS_AFTER_S, planned=planned
        )
        outputs = []
        with closing(self.engine.generate(requests, plan)) as finished:
            for out in finished:
                outputs.append(out)
                stats = self.engine.stats  # each generate call counts afresh
                work = (stats.prefill_tokens_computed, stats.sampled_tokens)
                progress.update(1, out.num_output_tokens, work=work)
        progress.close()
        return sorted(outputs, key=lambda o: o.index)

    def with_policy(self, policy: str) -> LLM:
        """A new ``LLM`` on the same loaded model under another scheduling policy; this one is
        unchanged. The two share the model's KV pool: run one at a time."""
        config = replace(self.engine.config, policy=policy)
        return LLM._from_engine(LLMEngine(config, self.engine.loaded))


def _params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt. Raises ValueError for a list of another length."""
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    if len(params) != n:
        raise ValueError(
            f"{n} prompts and {len(params)} SamplingParams: give one SamplingParams "
            "for all prompts or one per prompt"
        )
    return list(params)


def _with_message(index: int, choice: CompletionOutput, rendered: RenderedChat) -> CompletionOutput:
    """A chat choice with its assistant message (content, reasoning, tool calls)."""
    message, finish = assistant_message(
        choice.text, choice.finish_reason, rendered.reply, f"{index}:{choice.index}"
    )
    return replace(choice, message=message, finish_reason=finish)
