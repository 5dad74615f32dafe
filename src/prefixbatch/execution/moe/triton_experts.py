"""The experts as one fused Triton launch per projection (the structure of vLLM's fused MoE
kernel): the (token, expert) pairs sorted by expert in blocks of ``BLOCK_M`` rows that belong to
one expert (``routing.align_blocks``), each program computing a ``BLOCK_M x BLOCK_N`` tile of
its block's GEMM against its expert's weight, read in place from the stacked tensor.

1. gate/up: row ``pair`` of the output (T * top_k, 2I) is x[pair // top_k] @ gate_up[e].T;
2. SiLU-and-mul over all rows (PyTorch);
3. down: row ``pair`` of (T * top_k, H) is act[pair] @ down[e].T, times the pair's routing
   weight; the top_k rows of a token are then summed.

Accumulation is fp32 (IEEE dot products for fp32 inputs, so results match the PyTorch
reference to ~1e-6). Shapes depend on the token count alone and the layout is built on the
device, so a decode step with experts can be captured in a CUDA graph. Runs on CUDA, and on the
CPU under ``TRITON_INTERPRET=1`` (the tests; fp32 and fp16: the interpreter's bf16 dot is
wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers import silu_and_mul
from .experts import Experts
from .routing import align_blocks


@triton.jit
def expert_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    used_rows_ptr,
    route_ptr,
    num_pairs,
    n,
    k,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C[pair, :n] = A[pair // A_ROW_DIV, :k] @ W[expert, :n, :k].T (times route[pair] when
    WEIGHTED) for the rows of block ``program_id(0)``, columns of tile ``program_id(1)``;
    padding rows (pair == num_pairs) and blocks past ``used_rows`` write nothing."""
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(used_rows_ptr):
        return
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    real = pairs < num_pairs
    a_rows = pairs // A_ROW_DIV
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        kk = start + inner
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + kk[None, :],
            mask=real[:, None] & (kk[None, :] < k),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        w = tl.load(
            w_ptr + expert * stride_we + cols[None, :] * stride_wn + kk[:, None],
            mask=(kk[:, None] < k) & (cols[None, :] < n),
            other=0.0,
        )  # (BLOCK_K, BLOCK_N): the expert's rows ``cols``, transposed
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if WEIGHTED:
        acc = acc * tl.load(route_ptr + pairs, mask=real, other=0.0)[:, None]
    out = c_ptr + pairs[:, None] * stride_cm + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=real[:, None] & (cols[None, :] < n))


BLOCK_N = 64
BLOCK_K = 32


def block_m(pairs: int, num_experts: int) -> int:
    """Rows per block: 16 while experts get few rows each (decode), 64 once they get many."""
    return 16 if pairs <= 16 * num_experts else 64


def expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    layout_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    num_pairs: int,
    a_row_div: int,
    route: torch.Tensor | None,
) -> torch.Tensor:
    """One launch: a (rows, K), w (E, N, K) -> (num_pairs, N) in a's dtype (see the kernel)."""
    pair_ids, block_expert, used_rows, bm = layout_args
    n, k = w.shape[1], w.shape[2]
    if a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError("the experts' GEMM needs the last dimension contiguous")
    c = a.new_empty(num_pairs, n)
    grid = (pair_ids.numel() // bm, triton.cdiv(n, BLOCK_N))
    expert_gemm_kernel[grid](
        a,
        w,
        c,
        pair_ids,
        block_expert,
        used_rows,
        c if route is None else route,
        num_pairs,
        n,
        k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        c.stride(0),
        A_ROW_DIV=a_row_div,
        WEIGHTED=route is not None,
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )
    return c


def triton_experts(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x (T, H), weights and ids (T, top_k) -> (T, H) in x's dtype (``ExpertsKernel``)."""
    t, top_k = ids.shape
    pairs = t * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    layout = align_blocks(ids, experts.num_experts, block_m(pairs, experts.num_experts))
    args = (layout.pair_ids, layout.block_expert, layout.used_rows, layout.block_m)
    gate_up = expert_gemm(x, experts.gate_up_proj, args, pairs, top_k, None)  # (T * top_k, 2I)
    hidden = silu_and_mul(gate_up)  # (T * top_k, I)
    route = weights.reshape(-1).float().contiguous()
    out = expert_gemm(hidden, experts.down_proj, args, pairs, 1, route)  # weighted
    return out.view(t, top_k, -1).sum(dim=1)
