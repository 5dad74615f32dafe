"""Turn logits into next tokens on the logits' device: greedy, temperature, top-k, top-p and
per-request seeds, batched over the step's rows with no host round trip per row.

Sampling is the exponential race (equivalently Gumbel-max): a row draws
``argmax_v(logit_v / T - log(E_v))`` with ``E_v ~ Exp(1)``, which picks ``v`` with probability
``softmax(logits / T)_v`` (over the tokens the filters keep). The noise ``E_v`` is not drawn from
a generator: it is a counter-based hash (splitmix64, Steele et al., "Fast splittable pseudorandom
number generators", OOPSLA 2014) of (request seed, output index within the request, token id),
computed with int64 torch ops. A seeded request therefore samples the same tokens whatever else
shares its batch, at any row of it, and the same integer math runs on the CPU and on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..sampling_params import SamplingParams
from .upload import Staged, upload

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's stream increment (odd, 2^64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def as_int64(value: int) -> int:
    """An unsigned 64-bit value (any int is reduced mod 2^64) as the signed int64 that has the
    same bits, so it fits a torch.int64 tensor."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on int64)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer over int64 bit patterns (multiplications wrap mod 2^64)."""
    x = (x ^ _shr(x, 30)) * as_int64(_MIX1)
    x = (x ^ _shr(x, 27)) * as_int64(_MIX2)
    return x ^ _shr(x, 31)


def row_keys(seeds: torch.Tensor, output_index: torch.Tensor) -> torch.Tensor:
    """(S,) int64 key of each row's draw: element ``output_index`` of a splitmix64 stream
    seeded with the mixed request seed."""
    return mix64(mix64(seeds) + (output_index + 1) * as_int64(_GOLDEN_GAMMA))


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys (S,) int64 -> (S, vocab) fp32 samples of Exp(1), one per (row, token id): the token
    id's element of the row key's splitmix64 stream, its top 53 bits as a uniform in (0, 1)."""
    token = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    bits = mix64(keys[:, None] + token[None, :] * as_int64(_GOLDEN_GAMMA))
    uniform = (_shr(bits, 11).to(torch.float64) + 0.5) * 2.0**-53
    return (-torch.log(uniform)).to(torch.float32)


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampled rows (the rows that are not greedy), on the logits' device.

    ``rows`` (R,) int64 are their indices into the step's logits; per row, ``temperature``
    (R,) fp32, ``top_k`` (R,) int64 (0 where the filter is off), ``top_p`` (R,) fp32 (1 there)
    and ``keys`` (R,) int64 from ``row_keys``. The flags say whether any row needs that filter,
    so a step without filters skips the sort. A step whose rows are all greedy has none: it is
    one argmax.
    """

    rows: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: torch.Tensor
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def stage(
        cls,
        rows: Sequence[int],
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        output_index: Sequence[int],
    ) -> Staged[SamplingTensors] | None:
        """Host arrays of the sampled rows ``rows`` (indices into the step's logits), with, per
        sampled row, its ``params``, its request's seed (any int, taken mod 2^64) and the index
        of the output token it draws (0 for a request's first); None when no row samples. Work
        is per sampled row only."""
        if not rows:
            return None
        top_k = [max(p.top_k, 0) for p in params]
        top_p = [p.top_p for p in params]
        seed_t = torch.tensor([as_int64(s) for s in seeds], dtype=torch.int64)
        index_t = torch.tensor(list(output_index), dtype=torch.int64)
        arrays = {
            "rows": np.array(rows, dtype=np.int64),
            "temperature": np.array([p.temperature for p in params], dtype=np.float32),
            "top_k": np.array(top_k, dtype=np.int64),
            "top_p": np.array(top_p, dtype=np.float32),
            "keys": row_keys(seed_t, index_t).numpy(),
        }
        any_top_k, any_top_p = any(k > 0 for k in top_k), any(p < 1.0 for p in top_p)

        def build(t: dict[str, torch.Tensor]) -> SamplingTensors:
            keys = ("rows", "temperature", "top_k", "top_p", "keys")
            return cls(*(t[k] for k in keys), any_top_k, any_top_p)

        return Staged(arrays, build)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        output_index: Sequence[int],
        device: torch.device,
    ) -> SamplingTensors | None:
        """The non-greedy rows of a step (``params``, ``seeds``, ``output_index`` per row of
        its logits) on ``device``; None when every row is greedy."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        staged = cls.stage(
            rows,
            [params[i] for i in rows],
            [seeds[i] for i in rows],
            [output_index[i] for i in rows],
        )
        return None if staged is None else staged.build(upload(staged.arrays, device))


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_top_p: bool = True
) -> torch.Tensor:
    """Mask (S, vocab) logits outside each row's top-k and top-p nucleus with -inf.

    Top-k keeps every token whose logit reaches the row's k-th largest (ties kept); ``top_k`` is
    0 (or at least the vocabulary size) where the filter is off. Top-p then keeps, in descending
    order, each token whose predecessors' probability (renormalised after top-k) is below
    ``top_p``: the smallest prefix whose mass reaches ``top_p``; the most likely token stays.
    ``top_p >= 1`` rows are not cut (the cumulative sum may round above 1).
    """
    ordered, order = torch.sort(logits, dim=-1, descending=True)  # (S, V)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = ordered.gather(1, (k - 1)[:, None])  # (S, 1)
    keep = ordered >= kth
    if use_top_p:
        probs = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs
        keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    return logits.masked_fill(~mask, float("-inf"))


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(S, vocab) -> (S,) int64: the first index of each row's maximum."""
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    tensors: SamplingTensors | None,
    argmax_rows: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
) -> torch.Tensor:
    """logits (S, vocab) fp32 -> (S,) int64 token ids on the logits' device (the caller makes one
    copy to the host per step). Greedy rows take ``argmax_rows`` of the raw logits (a compiled
    kernel on the CPU fast path, ``torch_argmax`` otherwise); the sampled rows ``tensors.rows``
    (None: none) draw by the exponential race, computed for those rows only."""
    argmax = argmax_rows(logits)
    if tensors is None:
        return argmax
    scaled = logits.index_select(0, tensors.rows) / tensors.temperature[:, None]
    if tensors.any_top_k or tensors.any_top_p:
        scaled = filter_logits(scaled, tensors.top_k, tensors.top_p, tensors.any_top_p)
    noise = exponential_noise(tensors.keys, logits.shape[-1])
    drawn = (scaled - noise.log()).argmax(dim=-1)
    return argmax.index_copy(0, tensors.rows, drawn)
