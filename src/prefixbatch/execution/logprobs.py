"""Log-probabilities of chosen tokens and the top-k alternatives, from fp32 logits.

What is returned are the model's raw log-probabilities: ``log_softmax`` of the logits of the
step that produced the token, before temperature, penalties, biases or a grammar mask, as vLLM
returns them by default (``logprobs_mode="raw_logprobs"``). The same function serves sampled
tokens (one logits row per sampled token) and prompt tokens (the logits at position ``i`` score
prompt token ``i + 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..outputs import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs (chat) and logprobs (completions: 5)


@dataclass(frozen=True)
class LogprobTensors:
    """Batched result for ``S`` positions with up to ``k`` alternatives each."""

    token_ids: torch.Tensor  # (S,) long
    logprobs: torch.Tensor  # (S,) fp32
    top_ids: torch.Tensor  # (S, k) long
    top_logprobs: torch.Tensor  # (S, k) fp32

    def entries(self, top_counts: list[int]) -> list[TokenLogprob]:
        """Python records, row ``i`` keeping its first ``top_counts[i]`` alternatives
        (one device-to-host copy for the whole batch)."""
        ids, lps = self.token_ids.tolist(), self.logprobs.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            TokenLogprob(ids[i], lps[i], tuple(zip(top_ids[i][:n], top_lps[i][:n])))
            for i, n in enumerate(top_counts)
        ]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
    """``logits`` (S, vocab) fp32 and ``token_ids`` (S,) -> the log-probability of each row's
    token and the row's ``k`` (0..20) most likely tokens: one ``log_softmax``, one gather, one
    ``topk`` for the batch. Raises ValueError for ``k`` outside 0..20."""
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {k}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (S, vocab)
    token_ids = token_ids.to(device=logits.device, dtype=torch.long)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # (S,)
    top = logprobs.topk(k, dim=-1)  # (S, k), sorted most likely first
    return LogprobTensors(token_ids, chosen, top.indices, top.values)


def prompt_logprobs(
    logits: torch.Tensor, prompt: Sequence[int] | np.ndarray, start: int, k: int
) -> LogprobTensors:
    """Prompt scoring for one chunk: ``logits`` (T, vocab) are the model's outputs at prompt
    positions ``start .. start + T - 1``; position ``i`` predicts prompt token ``i + 1``, so the
    result covers prompt tokens ``start + 1 .. start + T`` (the last position of the prompt
    predicts the first output token and is dropped). Prompt token 0 has no log-probability."""
    stop = min(start + logits.shape[0], len(prompt) - 1)
    rows = stop - start
    targets = torch.tensor(prompt[start + 1 : stop + 1], dtype=torch.long)
    return compute_logprobs(logits[:rows], targets, k)
