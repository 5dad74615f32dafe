"""Per-request sampling parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .grammar_spec import GrammarSpec
from .pooling import EmbeddingParams
from .scoring import ScoreParams


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; the fields mean what vLLM's ``SamplingParams`` documents.

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes a sampled request reproducible whatever else is in the batch: its noise is a hash
    of its seed, its output index and the token id (``execution/sampler.py``).

    Stopping (see ``detokenizer.py``): a ``stop`` string ends the request and is cut from the text
    (kept when ``include_stop_str_in_output``); a ``stop_token_ids`` token, or the model's EOS
    token unless ``ignore_eos``, ends it and its text is left out (kept when
    ``include_stop_str_in_output``; the token id is always in the output ids). Until
    ``min_tokens`` tokens are generated EOS and ``stop_token_ids`` cannot be sampled and stop
    strings are not checked. ``skip_special_tokens`` leaves special tokens out of the text.

    ``n`` choices are sampled from one prompt (computed once); choice ``i`` of a seeded request
    draws from its own stream, so it is reproducible. ``logprobs`` (0..20, None: off) returns the
    chosen tokens' raw log-probabilities with that many alternatives; ``prompt_logprobs`` the
    same for the prompt's tokens. ``presence_penalty``, ``frequency_penalty`` (-2..2) and
    ``logit_bias`` (token id -> -100..100) are OpenAI's; ``repetition_penalty`` (> 0, 1: off),
    ``min_p`` (0..1) and ``min_tokens`` are vLLM's (``execution/penalties.py``). ``structured``
    constrains the output to a JSON schema, JSON object, regex or choice
    (``GrammarSpec.from_request``).

    ``embedding`` makes the request an embedding request (``/v1/embeddings``): its prompt is
    prefilled, its hidden states pooled (``pooling.py``) and nothing is sampled; the sampling
    fields do not apply (``max_tokens`` is 1, the KV its prompt holds). ``score`` (with
    ``embedding`` set: it runs as one) makes it a score request (``/v1/score``, ``/v1/rerank``):
    the last token's state goes through the model's score head instead (``scoring.py``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Stored as sorted (token id, bias) pairs so the params stay hashable; a dict is accepted.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    structured: GrammarSpec | None = None
    embedding: EmbeddingParams | None = None
    score: ScoreParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(v)) for t, v in pairs)))
        if self.score is not None and self.embedding is None:
            raise ValueError("a score request runs as an embedding request: set embedding too")
        self._check_extensions()

    def _check_extensions(self) -> None:
        """Ranges of the fields added for logprobs, n, penalties (OpenAI's and vLLM's limits)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be in 0..20, got {value}")
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(-100 <= v <= 100 for _, v in self.logit_bias), "logit_bias values: -100..100"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def sampled_choices(self) -> int:
        """Choices the request samples, each up to ``max_tokens``: ``n``, none for an embedding
        request (its ``max_tokens`` 1 only holds its KV)."""
        return 0 if self.embedding is not None else self.n
