"""Scoring: what a ``/v1/score`` or ``/v1/rerank`` request asks for (``ScoreParams``) and how a
model turns its score head's logit into a score (``ScoreConfig``, read from the checkpoint by
``loading/score_config.py``).

A score request is a query-document pair run as one prompt, prefill only (vLLM's cross-encoder
scoring, ``vllm/entrypoints/pooling/score``): the model's score head reads the final-norm
hidden state of the pair's last token and gives one logit, which the activation turns into the
score. The head is a sequence classifier's ``score`` matrix (transformers'
``*ForSequenceClassification`` with one label), or two tokens' logits of a causal LM reranker
(Qwen3-Reranker: the logit is ``logit(true) - logit(false)``, so its sigmoid is the softmax
over the two, p(true): vLLM's ``from_2_way_softmax`` conversion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ACTIVATIONS = ("sigmoid", "identity")


@dataclass(frozen=True)
class ScoreParams:
    """One score request's options. ``use_activation`` (vLLM's field; False: the raw logit);
    the others only the output format reads: ``fields`` (the two fields the pair came from,
    for errors: ``text_1``/``text_2``, ``queries``/``documents``, ...), and for ``/v1/rerank``
    ``top_n`` (0: every document) and ``return_documents`` (each result repeats its text)."""

    use_activation: bool = True
    fields: tuple[str, str] = ("text_1", "text_2")
    top_n: int = 0
    return_documents: bool = True


@dataclass(frozen=True)
class ScoreConfig:
    """How a model's scores are made: ``activation`` on the head's logit (``sigmoid``, vLLM's
    default for one label; ``identity`` where the checkpoint's sentence-transformers config
    names ``torch.nn.modules.linear.Identity``), and whether a pair is tokenized as a pair
    (``pair_tokens``: ``tokenizer(text_1, text_pair=text_2)``, vLLM's default) or as the one
    text ``text_1 + text_2`` (config.json ``use_sep_token: false``)."""

    activation: Literal["sigmoid", "identity"] = "sigmoid"
    pair_tokens: bool = True

    def activate(self, logit: float, params: ScoreParams) -> float:
        """The score of a head's logit, as the request asks (raw with ``use_activation``
        false)."""
        if not params.use_activation or self.activation == "identity":
            return logit
        return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else _sigmoid_negative(logit)


def _sigmoid_negative(x: float) -> float:
    """sigmoid(x) for x < 0 without overflow in exp(-x)."""
    e = math.exp(x)
    return e / (1.0 + e)
