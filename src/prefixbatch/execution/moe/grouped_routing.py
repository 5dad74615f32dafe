"""DeepSeek's expert routing: softmax or sigmoid scores, experts chosen within the best groups.

DeepSeek-V2 (DeepSeek-AI, 2024, "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model") scores experts by a softmax and, with ``group_limited_greedy``,
first keeps the ``topk_group`` of the ``n_group`` expert groups whose best expert scores highest
(device-limited routing). DeepSeek-V3 (DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report") scores
by a sigmoid, adds a per-expert bias (``e_score_correction_bias``, the auxiliary-loss-free load
balancing) for choosing only, and ranks groups by the sum of their two best biased scores. Both
then take the ``top_k`` experts of the kept groups, weight each by its unbiased score
(renormalised to sum to 1 with ``norm_topk_prob``) and scale by ``routed_scaling_factor``
(transformers' ``DeepseekV2TopkRouter`` / ``DeepseekV3TopkRouter``, vLLM's ``grouped_topk``).
The result is what ``select_experts`` returns, for the same experts kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupedRouting:
    """How a DeepSeek router chooses: ``scoring`` ``softmax`` (V2) or ``sigmoid`` (V3);
    ``num_groups`` groups of consecutive experts of which ``top_groups`` are kept, ranked by
    ``group_score``: ``max`` (V2: the best expert) or ``top2`` (V3: the sum of the two best);
    ``top_k`` experts per token; ``renormalize`` the chosen weights to sum 1; ``scaling``, the
    factor on the weights. One group keeps every expert (V2's ``greedy``).

    Raises ValueError when the experts do not split into the groups, or the kept groups hold
    fewer than ``top_k`` experts."""

    top_k: int
    scoring: str = "softmax"
    num_groups: int = 1
    top_groups: int = 1
    group_score: str = "max"
    renormalize: bool = False
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid") or self.group_score not in ("max", "top2"):
            raise ValueError(f"scoring {self.scoring!r}, group score {self.group_score!r}")
        if not 1 <= self.top_groups <= self.num_groups:
            raise ValueError(f"{self.top_groups} of {self.num_groups} expert groups")

    def check(self, experts: int) -> None:
        """Raises ValueError unless ``experts`` split into the groups and the kept groups hold
        at least ``top_k`` of them."""
        if experts % self.num_groups:
            raise ValueError(f"{experts} experts do not split into {self.num_groups} groups")
        kept = experts // self.num_groups * self.top_groups
        if not 1 <= self.top_k <= kept:
            raise ValueError(f"top_k {self.top_k} must be between 1 and the {kept} experts kept")


def select_grouped_experts(
    router_logits: torch.Tensor,
    routing: GroupedRouting,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (T, E) -> weights (T, top_k) fp32 and distinct expert ids (T, top_k)
    int64, in fp32 throughout. ``correction_bias`` (E,) is added to the scores for choosing
    groups and experts, never to the weights (V3). Experts outside the kept groups are never
    chosen (their scores are -inf for the choice; transformers writes 0, the same whenever the
    kept groups' scores are positive). Ties go as ``torch.topk`` orders them. Raises ValueError
    as ``GroupedRouting.check``."""
    t, experts = router_logits.shape
    routing.check(experts)
    logits = router_logits.float()
    scores = logits.sigmoid() if routing.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if routing.top_groups < routing.num_groups:
        grouped = choice.view(t, routing.num_groups, -1)  # (T, groups, experts per group)
        if routing.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(routing.top_groups, dim=-1).indices  # (T, top_groups)
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~mask[..., None], float("-inf")).view(t, experts)
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scaling, ids
