"""What a request must fit to run on an engine: the model's context, vocabulary and KV pool."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import EngineConfig, ModelConfig
from ..pooling import PoolingConfig
from ..sampling_params import SamplingParams
from ..scoring import ScoreConfig


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    hidden_size: int = 0  # the embeddings' size
    pooling: PoolingConfig = field(default_factory=PoolingConfig)  # how embeddings are pooled
    scoring: ScoreConfig = field(default_factory=ScoreConfig)  # how scores are made
    score_head: str | None = None  # the model's score head ("classifier", "tokens"), or none

    @classmethod
    def of(
        cls,
        config: EngineConfig,
        cfg: ModelConfig,
        num_blocks: int,
        pooling: PoolingConfig | None = None,
        scoring: ScoreConfig | None = None,
        score_head: str | None = None,
    ) -> EngineLimits:
        """The limits of ``cfg``'s model under ``config`` (``--max-model-len`` capped by the
        model's positions) with a pool of ``num_blocks``, pooling embeddings by ``pooling``,
        scoring by ``scoring`` with a score head of the kind ``score_head``
        (``score_config.score_head_kind``; None: the model does not score)."""
        return cls(
            config.context_len(cfg),
            num_blocks,
            config.block_size,
            cfg.vocab_size,
            cfg.hidden_size,
            pooling or PoolingConfig(),
            scoring or ScoreConfig(),
            score_head,
        )

    def kv_blocks(self, prompt_len: int, max_tokens: int) -> int:
        """Blocks for the request's prompt and its longest answer (capped by the context)."""
        return math.ceil(min(prompt_len + max_tokens, self.max_model_len) / self.block_size)

    def fits_kv(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether the pool holds the request's prompt and its longest answer."""
        return self.kv_blocks(prompt_len, max_tokens) <= self.num_blocks

    def check(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        explicit: bool = False,
        embedding: bool = False,
    ) -> str | None:
        """Why a tokenized request cannot run, or None (``prompt``: a list or an array). With
        ``explicit`` (``max_tokens`` was asked for, not defaulted) prompt + ``max_tokens`` must
        fit the context (``check_context``); that is checked before the KV pool, whose advice
        (a larger pool) cannot fix it. Checks run in that order: empty prompt, vocabulary,
        prompt length, context, KV pool; the first failing one is reported. An ``embedding``
        request generates nothing: its input may fill the whole context."""
        if not len(prompt):
            return "the prompt is empty"
        ids = np.asarray(prompt)
        outside = ids[(ids < 0) | (ids >= self.vocab_size)]
        if outside.size:
            bad = int(outside[0])
            return (
                f"token id {bad} is outside the model's vocabulary (ids 0 to {self.vocab_size - 1})"
            )
        if embedding:
            if len(prompt) > self.max_model_len:
                return (
                    f"the input has {len(prompt)} tokens; the model's context is "
                    f"{self.max_model_len} tokens"
                )
        elif len(prompt) >= self.max_model_len:
            return (
                f"the prompt has {len(prompt)} tokens; the model's context is "
                f"{self.max_model_len} tokens and at least one must be left to generate"
            )
        if explicit and (problem := self.check_context(len(prompt), max_tokens)):
            return problem
        if not self.fits_kv(len(prompt), max_tokens):
            need = self.kv_blocks(len(prompt), max_tokens)
            return (
                f"the request needs {need} KV blocks and the cache has {self.num_blocks}; "
                "raise --kv-cache-memory"
            )
        return None

    def check_context(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request whose ``max_tokens`` was asked for explicitly cannot run: the prompt
        and that many tokens must fit the model's context, as vLLM's OpenAI server requires (a
        default ``max_tokens`` is cut at the context instead). None when it fits."""
        if prompt_len + max_tokens <= self.max_model_len:
            return None
        return (
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"context is {self.max_model_len} tokens and the prompt has {prompt_len} "
            f"({max_tokens} > {self.max_model_len} - {prompt_len}); lower max_tokens"
        )

    def check_score(self) -> str | None:
        """Why this model cannot score pairs, or None: it has no score head (a causal LM
        without score tokens), or it pools by mean (a score reads the last token)."""
        if self.score_head is None:
            return (
                "this model cannot score: it has no score head (load a "
                "*ForSequenceClassification checkpoint, or give a causal LM reranker its "
                "score tokens: --score-tokens no,yes)"
            )
        if self.pooling.every_row:
            return (
                "this model pools by mean (its sentence-transformers files); a score reads "
                "the last token"
            )
        return None

    def check_params(self, params: SamplingParams) -> str | None:
        """Why a request's sampling parameters cannot run on this model, or None: token ids
        outside the vocabulary, a grammar that does not compile, ``dimensions`` the model was
        not trained for, text asked of a sequence classifier (it has no trained lm_head)."""
        outside = [t for t, _ in params.logit_bias if not 0 <= t < self.vocab_size]
        if outside:
            return (
                f"logit_bias token id {outside[0]} is outside the model's vocabulary "
                f"(ids 0 to {self.vocab_size - 1})"
            )
        if params.score is not None:
            return self.check_score()
        if params.embedding is not None:
            return self.pooling.check(params.embedding, self.hidden_size)
        if self.score_head == "classifier":  # vLLM serves a classifier as a pooling model only
            return (
                "this model is a sequence classifier (a score head and no lm_head): it answers "
                "/v1/score, /v1/rerank and /v1/embeddings lines and cannot generate text"
            )
        if params.structured is not None:
            try:
                params.structured.check()
            except ValueError as e:
                return str(e)
        return None
