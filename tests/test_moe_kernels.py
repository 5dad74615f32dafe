"""Mixture-of-experts routing and the experts' kernels without a model: the routing's edge
cases (ties, top_k = number of experts, an expert that gets no tokens, a single token), the
block layout of the fused kernel (as a property), and every kernel (the PyTorch reference,
the CPU fast path, the Triton kernel under the interpreter in fp32 and fp16) against a plain
per-token loop."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.execution.attention.triton_backend import triton_available
from prefixbatch.execution.layers import silu_and_mul
from prefixbatch.execution.moe.cpu_experts import CpuExperts
from prefixbatch.execution.moe.experts import Experts, gemm_per_expert, grouped_experts
from prefixbatch.execution.moe.routing import align_blocks, select_experts, sort_by_expert

HIDDEN, INTERMEDIATE = 48, 40  # not multiples of the Triton tiles


def per_token(experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """The definition, one token and one chosen expert at a time (fp32)."""
    out = torch.zeros(x.shape[0], experts.hidden)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate_up = experts.gate_up_proj[e].float() @ x[t].float()
            out[t] += w * (experts.down_proj[e].float() @ silu_and_mul(gate_up[None])[0])
    return out


def make_experts(num: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(num, HIDDEN, INTERMEDIATE)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    return experts.to(dtype)


def triton_kernel():  # type: ignore[no-untyped-def]
    if not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    from prefixbatch.execution.moe.triton_experts import triton_experts

    return triton_experts


KERNELS = ["torch", "cpu", "triton-fp32", "triton-fp16"]


def run(kernel: str, experts: Experts, x, weights, ids):  # type: ignore[no-untyped-def]
    """The kernel's output (fp32) for fp32 experts and x (fp16 copies for triton-fp16)."""
    with torch.inference_mode():
        if kernel == "torch":
            return grouped_experts(experts, x, weights, ids)
        if kernel == "cpu":  # it repacks (and drops) the weights of the experts it is given
            packed = copy.deepcopy(experts)
            cpu = CpuExperts(packed, silu_and_mul)
            assert cpu.gemm is not gemm_per_expert  # CI has a compiler: the one-region GEMM
            return cpu(packed, x, weights, ids)
        if kernel == "triton-fp32":
            return triton_kernel()(experts, x, weights, ids)
        half = copy.deepcopy(experts).half()
        return triton_kernel()(half, x.half(), weights, ids).float()


def routing_case(case: str) -> tuple[torch.Tensor, int, int, bool]:
    """(router logits (T, E), top_k, E, renormalize) of a named edge case."""
    gen = torch.Generator().manual_seed(1)
    if case == "random":
        return torch.randn(37, 8, generator=gen), 2, 8, True
    if case == "ties":  # every logit equal within a token, and two tokens with a tied pair
        logits = torch.zeros(5, 6)
        logits[3, [1, 4]] = 2.0
        logits[4, [0, 2, 5]] = 1.5
        return logits, 2, 6, True
    if case == "expert-without-tokens":  # expert 3 (and 0) never chosen
        logits = torch.randn(29, 8, generator=gen)
        logits[:, [0, 3]] = -30.0
        return logits, 3, 8, False
    if case == "top-k-all-experts":
        return torch.randn(11, 4, generator=gen), 4, 4, False
    if case == "single-token":
        return torch.randn(1, 8, generator=gen), 2, 8, True
    raise ValueError(case)


CASES = ["random", "ties", "expert-without-tokens", "top-k-all-experts", "single-token"]


@pytest.mark.parametrize("case", CASES)
def test_routing_edge_cases(case):  # type: ignore[no-untyped-def]
    logits, top_k, num, renormalize = routing_case(case)
    weights, ids = select_experts(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.shape == (logits.shape[0], top_k)
    assert all(len(set(row)) == top_k for row in ids.tolist())  # distinct experts per token
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.gather(1, ids)
    assert (chosen.min(dim=1).values >= probs.topk(top_k).values[:, -1] - 1e-7).all()
    expected = chosen / chosen.sum(dim=1, keepdim=True) if renormalize else chosen
    torch.testing.assert_close(weights, expected)
    if case == "ties":
        torch.testing.assert_close(weights[:3], torch.full((3, 2), 0.5))
        assert sorted(ids[3].tolist()) == [1, 4] and set(ids[4].tolist()) < {0, 2, 5}
    if case == "top-k-all-experts":
        assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(11))
    if case == "expert-without-tokens":
        assert not ({0, 3} & set(ids.flatten().tolist()))
    with pytest.raises(ValueError, match="top_k 9"):
        select_experts(logits, 9 if num < 9 else num + 1, renormalize)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_per_token_definition(kernel, case):  # type: ignore[no-untyped-def]
    logits, top_k, num, renormalize = routing_case(case)
    experts = make_experts(num)
    x = torch.randn(logits.shape[0], HIDDEN, generator=torch.Generator().manual_seed(2))
    weights, ids = select_experts(logits, top_k, renormalize)
    want = per_token(experts, x, weights, ids)
    got = run(kernel, experts, x, weights, ids)
    assert got.shape == want.shape
    fp16 = kernel == "triton-fp16"
    tol = {"atol": 2e-2, "rtol": 2e-2} if fp16 else {"atol": 2e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.float(), want, **tol)


def test_cpu_experts_without_a_compiler_use_the_per_expert_loop(kernels_cannot_build):  # type: ignore[no-untyped-def]
    logits, top_k, num, renormalize = routing_case("expert-without-tokens")
    experts = make_experts(num)
    x = torch.randn(logits.shape[0], HIDDEN)
    weights, ids = select_experts(logits, top_k, renormalize)
    want = per_token(experts, x, weights, ids)
    with pytest.warns(UserWarning, match="grouped GEMM of the CPU experts could not be built"):
        cpu = CpuExperts(experts, silu_and_mul)
    assert cpu.gemm is gemm_per_expert
    with torch.inference_mode():
        torch.testing.assert_close(cpu(experts, x, weights, ids), want, atol=2e-5, rtol=1e-5)


def test_native_grouped_gemm_tiles_long_slices():  # type: ignore[no-untyped-def]
    """Slices longer than a tile (64 rows) and empty ones, against one torch.mm per slice."""
    from prefixbatch.execution.moe.cpu_experts import native_grouped_gemm

    gemm = native_grouped_gemm()
    assert gemm is not None
    counts = torch.tensor([0, 150, 1, 0, 64, 65], dtype=torch.int64)
    rows, weights = torch.randn(int(counts.sum()), 24), torch.randn(6, 24, 40)
    out, want = torch.empty(rows.shape[0], 40), torch.empty(rows.shape[0], 40)
    gemm(out, rows, weights, counts)
    gemm_per_expert(want, rows, weights, counts)
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="counts must sum to the rows"):
        gemm(out, rows, weights, counts + 1)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    data=st.data(),
    block_m=st.sampled_from([1, 4, 16]),
)
def test_block_layout_holds_every_pair_once_in_expert_blocks(tokens, num_experts, data, block_m):  # type: ignore[no-untyped-def]
    top_k = data.draw(st.integers(1, num_experts))
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    ids = select_experts(logits, top_k, False)[1]
    layout = align_blocks(ids, num_experts, block_m)
    pairs, flat = tokens * top_k, ids.flatten()
    used = int(layout.used_rows)
    assert layout.pair_ids.numel() % block_m == 0 and used % block_m == 0
    assert used <= layout.pair_ids.numel()
    real = layout.pair_ids[:used]
    assert sorted(real[real < pairs].tolist()) == list(range(pairs))  # each pair exactly once
    assert (layout.pair_ids[used:] == pairs).all()  # nothing past the used rows
    order, counts = sort_by_expert(ids, num_experts)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    for b in range(used // block_m):
        rows = real[b * block_m : (b + 1) * block_m]
        rows = rows[rows < pairs].long()
        assert (flat[rows] == int(layout.block_expert[b])).all()  # one expert per block
        assert rows.tolist() == sorted(rows.tolist())  # tokens in order within an expert
    assert torch.equal(flat[order], flat.sort(stable=True).values)


def test_weight_loader_fills_each_expert_and_projection():  # type: ignore[no-untyped-def]
    experts = Experts(3, 4, 2)
    tensors = {(e, p): torch.randn(4 if p == "down" else 2, 2 if p == "down" else 4)
               for e in range(3) for p in ("gate", "up", "down")}  # fmt: skip
    for (e, p), tensor in tensors.items():
        name, shard = Experts.shard(e, p)
        experts.weight_loader(getattr(experts, name), tensor, shard)
    for e in range(3):
        want = torch.cat([tensors[e, "gate"], tensors[e, "up"]])
        assert torch.equal(experts.gate_up_proj[e], want)
        assert torch.equal(experts.down_proj[e], tensors[e, "down"])
    assert experts.shards_of("gate_up_proj") == set(range(6))
    stacked = torch.randn(3, 4, 2)  # a stacked checkpoint tensor loads whole
    experts.weight_loader(experts.down_proj, stacked, None)
    assert torch.equal(experts.down_proj.data, stacked)
    with pytest.raises(ValueError, match=r"shape \(4, 2\) where \(2, 4\)"):
        experts.weight_loader(experts.gate_up_proj, tensors[0, "down"], 1)
