"""Top-k expert routing and the token orders the experts' kernels work in.

A mixture-of-experts layer (Shazeer et al., 2017; Mixtral, Jiang et al., 2024) sends each token
to the ``top_k`` experts its router scores highest and sums their outputs weighted by the
router's probabilities. The kernels never loop over tokens: the T x top_k (token, expert) pairs
are sorted by expert, so each expert runs one GEMM over a contiguous slice of rows
(``sort_by_expert``), or one fused launch walks block-aligned slices (``align_blocks``, the
layout of vLLM's ``moe_align_block_size``); ``combine`` brings the rows back to their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, then the ``top_k`` largest: router_logits (T, E) ->
    weights (T, top_k) fp32 and expert ids (T, top_k) int64, most probable first.

    ``renormalize``: the chosen weights are divided by their sum (Mixtral always; Qwen-MoE and
    OLMoE where the config sets ``norm_topk_prob``), else they stay softmax probabilities.
    Equal logits are ordered as ``torch.topk`` orders them (the same call transformers makes);
    the ``top_k`` ids of a token are always distinct. Raises ValueError unless
    ``1 <= top_k <= E``."""
    experts = router_logits.shape[-1]
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k {top_k} must be between 1 and the {experts} experts")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids (T, top_k) -> rows per expert (E,) int64, without a host sync (``bincount`` reads
    the largest id back to size its output)."""
    flat = ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs grouped by expert: ids (T, top_k) -> ``order`` (T * top_k,)
    int64, the flat pair indices (``token * top_k + slot``) sorted by expert (stable: tokens in
    order within an expert), and ``counts`` (E,) int64, so expert ``e`` owns sorted rows
    ``[sum(counts[:e]), sum(counts[:e + 1]))``; the rows' tokens are ``order // top_k``."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    return order, expert_counts(ids, num_experts)


def combine(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' outputs back at their tokens, weighted and summed: rows (T * top_k, H) in
    ``order`` (``sort_by_expert``), weights (T, top_k) -> (T, H) in ``rows``' dtype."""
    t, top_k = weights.shape
    inverse = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    by_pair = rows.index_select(0, inverse)  # row of pair p = token * top_k + slot
    return weighted_sum(by_pair.view(t, top_k, -1), weights)


def weighted_sum(per_slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """per_slot (T, top_k, H), weights (T, top_k) -> sum over the slots of weight x row (T, H),
    in ``per_slot``'s dtype."""
    return torch.bmm(weights.to(per_slot.dtype).unsqueeze(1), per_slot).squeeze(1)


@dataclass(frozen=True)
class BlockLayout:
    """The sorted (token, slot) pairs in blocks of ``block_m`` rows, each block owned by one
    expert, for one fused launch over all experts (vLLM's ``moe_align_block_size``):

    ``pair_ids`` (capacity,) int32: the flat pair index at each padded row, ``T * top_k`` (no
    pair) in the padding that rounds each expert's rows up to whole blocks and past the end;
    ``block_expert`` (capacity // block_m,) int32: the expert of each block (meaningless past
    ``used_rows``); ``used_rows`` (1,) int32: rows up to the last real block. ``capacity``
    bounds the padded rows for any routing of T tokens (``T * top_k`` plus ``block_m - 1`` for
    each expert that can get rows), so shapes depend on T alone and nothing is read back to
    the host (a CUDA graph can replay it)."""

    pair_ids: torch.Tensor
    block_expert: torch.Tensor
    used_rows: torch.Tensor
    block_m: int


def align_blocks(ids: torch.Tensor, num_experts: int, block_m: int) -> BlockLayout:
    """ids (T, top_k) -> the block layout of its pairs (see ``BlockLayout``)."""
    t, top_k = ids.shape
    pairs = t * top_k
    capacity = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    device = ids.device
    flat = ids.reshape(-1)
    counts = expert_counts(ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    starts, padded_starts = counts.cumsum(0) - counts, padded_end - padded
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(pairs, device=device) - starts[experts]  # place within its expert
    pair_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    pair_ids[padded_starts[experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    return BlockLayout(pair_ids, block_expert, padded_end[-1:].to(torch.int32), block_m)
