"""The Python API: ``LLM(model=...).generate(prompts, SamplingParams(...))`` and ``LLM.chat``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import Request, RequestOutput
from .planning.plan import make_plan
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """An offline engine. Keyword arguments are ``EngineConfig`` fields (``kv_cache_memory``
    also accepts strings such as ``"512MiB"``)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from .config import parse_memory

        if isinstance(kwargs.get("kv_cache_memory"), str):
            kwargs["kv_cache_memory"] = parse_memory(kwargs["kv_cache_memory"])
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
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
    ) -> list[RequestOutput]:
        """Outputs in prompt order. A prompt is text or a list of token ids; ``params`` is one
        SamplingParams for all or one per prompt. Raises ValueError for a params list of another
        length or a prompt that cannot run (token ids outside the vocabulary, too long)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return self._run(ids, params)

    def chat(
        self,
        conversations: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
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
        return self._run([self.tokenizer.encode_chat(c, **options) for c in conversations], params)

    def _run(
        self, ids: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None
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
        return sorted(self.engine.generate(requests, plan), key=lambda o: o.index)

    def with_policy(self, policy: str) -> LLM:
        """A new ``LLM`` on the same loaded model under another scheduling policy; this one is
        unchanged. The two share the model's KV pool: run one at a time."""
        config = replace(self.engine.config, policy=policy)
        return LLM._from_engine(LLMEngine(config, self.engine.loaded))
