"""A model's score head: the final-norm hidden state of a pair's last token -> one logit.

Two kinds, as vLLM runs decoder rerankers (``vllm/model_executor/models/adapters.py``):

- a sequence classifier's ``score`` matrix (transformers' ``*ForSequenceClassification`` with
  one label): ``hidden @ score.T``;
- a causal LM that answers a relevance question with a token (Qwen3-Reranker: "yes" or "no"
  after its prompt template): the model's own logits of the ``false`` and ``true`` tokens at the
  last position, and the logit ``logit(true) - logit(false)``, whose sigmoid is the softmax over
  the two, p(true) (vLLM's ``classifier_from_token`` with ``from_2_way_softmax``). The logits go
  through the family's output projection and its soft-capping (Gemma 2), as the forward's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ScoreHead:
    """Hidden states (S, hidden) fp32 -> logits (S,) fp32 (``__call__``); build it with
    ``classifier`` or ``tokens``."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._head = head

    @classmethod
    def classifier(cls, weight: torch.Tensor) -> ScoreHead:
        """A one-label classifier's ``score`` weight (1, hidden), applied in fp32."""
        w = weight.detach().float().t()  # (hidden, 1)
        return cls(lambda hidden: (hidden @ w)[:, 0])

    @classmethod
    def tokens(
        cls,
        logits: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        false_id: int,
        true_id: int,
    ) -> ScoreHead:
        """Two tokens' logits: ``logits`` maps final-norm hidden states (S, hidden) in the
        model's ``dtype`` to fp32 logits (S, vocab) (``CausalLM.logits``)."""

        def head(hidden: torch.Tensor) -> torch.Tensor:
            pair = logits(hidden.to(dtype))[:, [false_id, true_id]]  # (S, 2)
            return pair[:, 1] - pair[:, 0]

        return cls(head)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden)
