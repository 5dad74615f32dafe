"""The Python API: ``LLM(model=...).generate(prompts, SamplingParams(...))`` and ``LLM.chat``.

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

from .config import EngineConfig
from .engine import LLMEngine
from .execution.models.registry import DEFAULT_MODEL_NAME
from .io.progress import Progress
from .logs import log_to_stderr_unless_configured
from .outputs import Request, RequestOutput
from .planning.plan import make_plan
from .sampling_params import SamplingParams

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
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the chat template.
        ``developer`` messages are system messages; content may be a list of text parts.
        ``continue_final_message=True, add_generation_prompt=False`` makes the answer continue
        a final assistant message (vLLM's ``LLM.chat`` options). Raises ValueError as
        ``generate`` does, or when the template cannot render a conversation."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        options = dict(
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        chats = [self.tokenizer.encode_chat(c, **options) for c in conversations]
        return self._run(chats, params, use_tqdm)

    def _run(
        self,
        ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        """Raises ValueError when ``params`` is a list of another length than the prompts, or
        a prompt cannot run (token ids outside the vocabulary, too long, a logit_bias token
        outside it, a grammar that does not compile)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(
                f"{len(ids)} prompts and {len(params)} SamplingParams: give one SamplingParams "
                "for all prompts or one per prompt"
            )
        for i, (p, sp) in enumerate(zip(ids, params)):
            limits = self.engine.limits
            problem = limits.check(p, sp.max_tokens) or limits.check_params(sp)
            if problem:
                raise ValueError(f"prompt {i}: {problem}")
        requests = [Request(i, p, sp) for i, (p, sp) in enumerate(zip(ids, params))]
        plan = None
        if self.engine.config.policy.plans:  # the API plans the batch; the engine consumes it
            plan = make_plan(ids, [sp.max_tokens for sp in params], self.engine.config.block_size)
        progress = Progress(len(requests), quiet=not use_tqdm, after_s=PROGRESS_AFTER_S)
        outputs = []
        with closing(self.engine.generate(requests, plan)) as finished:
            for out in finished:
                outputs.append(out)
                progress.update(1, out.num_output_tokens)
        progress.close()
        return sorted(outputs, key=lambda o: o.index)

    def with_policy(self, policy: str) -> LLM:
        """A new ``LLM`` on the same loaded model under another scheduling policy; this one is
        unchanged. The two share the model's KV pool: run one at a time."""
        config = replace(self.engine.config, policy=policy)
        return LLM._from_engine(LLMEngine(config, self.engine.loaded))
