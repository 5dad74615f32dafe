"""The fused element-wise CPU kernels (``execution/fused_ops.py``) against the plain PyTorch ops
of ``layers.py`` (the reference), and the engine's use of them."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, shared_prefix_prompts
from prefixbatch import LLM, SamplingParams
from prefixbatch.config import RopeConfig
from prefixbatch.execution.fused_ops import FusedKernels, fused_kernels
from prefixbatch.execution.layers import (
    GemmaRMSNorm,
    RotaryEmbedding,
    apply_rope,
    gelu_tanh_and_mul,
    rms_norm,
    silu_and_mul,
)
from prefixbatch.execution.models.fused_forward import FusedForward
from prefixbatch.execution.sampler import torch_argmax

ROWS = [0, 1, 7, 64, 300]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def kernels() -> FusedKernels:
    built = fused_kernels()
    assert built is not None  # CI has a compiler
    return built


def qkv_views(
    t: int, heads: int, kv_heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv output (T, (H + 2 KVH) D) and its q (T, H, D), k (T, KVH, D) strided views."""
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return qkv, q.view(t, heads, dim), k.view(t, kv_heads, dim)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dim", [64, 576])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_pytorch(kernels, t, dim, eps):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + dim)
    x, weight = 3 * torch.randn(t, dim), torch.randn(dim)
    got = kernels.rms_norm(x, weight, eps)
    assert got.shape == (t, dim) and got.is_contiguous()
    torch.testing.assert_close(got, rms_norm(x, weight, eps), **TOL)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 32), (16, 8, 128)])
def test_head_rms_norm_matches_pytorch_on_strided_views(kernels, t, heads, kv_heads, dim):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + heads)
    qkv, q, k = qkv_views(t, heads, kv_heads, dim)
    weight = torch.randn(dim)
    expected_q, expected_k = rms_norm(q, weight, 1e-6), rms_norm(k, weight, 1e-6)
    before = qkv.clone()
    torch.testing.assert_close(kernels.rms_norm(q, weight, 1e-6), expected_q, **TOL)
    kernels.rms_norm_(q, weight, 1e-6)
    kernels.rms_norm_(k, weight, 1e-6)
    torch.testing.assert_close(q, expected_q, **TOL)
    torch.testing.assert_close(k, expected_k, **TOL)
    v_start = (heads + kv_heads) * dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])  # v untouched


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dim", [64, 576])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_fused_add_rms_norm_matches_pytorch(kernels, t, dim, eps):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + dim)
    x, residual, weight = torch.randn(t, dim), 5 * torch.randn(t, dim), torch.randn(dim)
    expected_sum = x + residual
    expected = rms_norm(expected_sum, weight, eps)
    kernels.fused_add_rms_norm_(x, residual, weight, eps)
    torch.testing.assert_close(residual, expected_sum, **TOL)
    torch.testing.assert_close(x, expected, **TOL)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("intermediate", [128, 1536])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: silu's exp far out on both sides
def test_silu_and_mul_matches_pytorch(kernels, t, intermediate, scale):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + intermediate)
    gate_up = scale * torch.randn(t, 2 * intermediate)
    got = kernels.silu_and_mul(gate_up)
    assert got.shape == (t, intermediate)
    torch.testing.assert_close(got, silu_and_mul(gate_up), **TOL)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("intermediate", [128, 1536])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: tanh saturated on both sides
def test_gelu_tanh_and_mul_matches_pytorch(kernels, t, intermediate, scale):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + intermediate)
    gate_up = scale * torch.randn(t, 2 * intermediate)
    got = kernels.gelu_tanh_and_mul(gate_up)
    assert got.shape == (t, intermediate)
    # PyTorch's 0.5 g (1 + tanh(z)) cancels where tanh(z) is near -1 (g about -3): its error
    # there is ~1e-7 of the gate's scale; the kernel's g * sigmoid(2z) does not cancel.
    torch.testing.assert_close(got, gelu_tanh_and_mul(gate_up), rtol=1e-5, atol=1e-5 * scale)


def test_gemma_norms_run_on_the_kernels_with_their_one_plus_w_weight(kernels):  # type: ignore[no-untyped-def]
    """``GemmaRMSNorm.kernel_weight`` (1 + w) makes the kernels compute Gemma's norm, on rows
    and on heads in place."""
    torch.manual_seed(3)
    norm = GemmaRMSNorm(64, 1e-6)
    torch.nn.init.normal_(norm.weight, std=0.5)
    x = 3 * torch.randn(7, 64)
    torch.testing.assert_close(kernels.rms_norm(x, norm.kernel_weight(), 1e-6), norm(x), **TOL)
    qkv, q, _ = qkv_views(7, 4, 2, 64)
    expected = norm(q)
    kernels.rms_norm_(q, norm.kernel_weight(), 1e-6)
    torch.testing.assert_close(q, expected, **TOL)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (4, 4, 32), (8, 1, 128)]
)
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rope_matches_pytorch_on_strided_views(kernels, t, heads, kv_heads, dim, rope_type):  # type: ignore[no-untyped-def]
    torch.manual_seed(t + heads + dim)
    rope = RopeConfig(theta=10000.0) if rope_type == "default" else llama3_rope()
    cos, sin = RotaryEmbedding(rope, dim).cos_sin(torch.randint(0, 4096, (t,)), torch.float32)
    qkv, q, k = qkv_views(t, heads, kv_heads, dim)
    expected_q, expected_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    before = qkv.clone()
    kernels.rotary_embedding_(q, k, cos, sin)
    torch.testing.assert_close(q, expected_q, **TOL)
    torch.testing.assert_close(k, expected_k, **TOL)
    v_start = (heads + kv_heads) * dim
    assert torch.equal(qkv[:, v_start:], before[:, v_start:])  # v untouched


def llama3_rope() -> RopeConfig:
    return RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position=64,
    )


def test_kernels_refuse_other_dtypes(kernels):  # type: ignore[no-untyped-def]
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="fp32 only"):
        kernels.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("rows", [0, 1, 5, 96])
def test_argmax_rows_matches_torch_argmax_ties_and_masked_rows_included(kernels, rows):  # type: ignore[no-untyped-def]
    torch.manual_seed(rows)
    logits = torch.randn(rows, 4099) * 8
    if rows > 1:
        logits[1, 10] = logits[1, 4000] = logits[1].max() + 1  # a tie: the first index wins
    if rows > 2:  # masked as structured output does; one row masked but its last entry
        logits[2] = float("-inf")
    if rows > 3:
        logits[3, :-1] = float("-inf")
    assert torch.equal(kernels.argmax_rows(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 64, 65, 200])
def test_argmax_rows_on_short_rows_and_span_edges(kernels, vocab):  # type: ignore[no-untyped-def]
    """Rows shorter than a vector, and ties inside and across the 64-value spans the kernel
    compares at once: the first index still wins."""
    torch.manual_seed(vocab)
    logits = torch.randint(0, 3, (40, vocab)).float()  # many ties
    assert torch.equal(kernels.argmax_rows(logits), logits.argmax(dim=-1))


def logits64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().t()


@pytest.mark.parametrize("rows", [0, 1, 15, 33, 100])
@pytest.mark.parametrize("hidden", [1, 7, 64, 129])
@pytest.mark.parametrize("vocab", [1, 5, 6, 1000, 3001])
def test_lm_head_argmax_picks_the_largest_logit(kernels, rows, hidden, vocab):  # type: ignore[no-untyped-def]
    """Against the float64 logits: the picked logit is the largest (within fp32 rounding of the
    sums), and it is torch.argmax's pick wherever the two largest are apart. Shapes cover
    partial row blocks (16 or 32 rows a block), partial vocabulary tiles (6 a tile), and one
    or two threads' parts of the vocabulary (1,024 entries a part at least)."""
    torch.manual_seed(rows * 1000 + hidden * 10 + vocab)
    x = torch.randn(rows, hidden)
    weight = torch.randn(vocab, hidden) / hidden**0.5
    got = kernels.lm_head_argmax(x, weight)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    if rows == 0:
        return
    exact = logits64(x, weight)
    top2 = exact.topk(min(2, vocab), dim=-1).values
    picked = exact.gather(1, got[:, None])[:, 0]
    assert (top2[:, 0] - picked).abs().max() < 1e-5
    apart = top2[:, 0] - top2[:, -1] > 1e-4 if vocab > 1 else torch.ones(rows, dtype=torch.bool)
    assert torch.equal(got[apart], exact.argmax(dim=-1)[apart])


def test_lm_head_argmax_takes_the_first_of_tied_logits(kernels):  # type: ignore[no-untyped-def]
    """Equal weight rows give bit-equal logits: the first index wins, inside a micro-tile,
    across tiles and across the threads' vocabulary parts, as torch.argmax."""
    torch.manual_seed(0)
    x = torch.randn(40, 32)
    weight = torch.randn(5000, 32) * 0.1
    best = torch.randn(32)
    for at in (4700, 2, 3, 2600, 1030):
        weight[at] = best * 10  # the largest logit of every row where x . best > 0
    got = kernels.lm_head_argmax(x, weight)
    wins = x @ best > 0
    assert wins.any() and (~wins).any()
    assert (got[wins] == 2).all()
    assert torch.equal(got[~wins], logits64(x, weight).argmax(dim=-1)[~wins])


def test_lm_head_argmax_reads_strided_rows_and_refuses_bad_inputs(kernels):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    both = torch.randn(20, 2, 48)
    weight = torch.randn(300, 48)
    x = both[:, 1]  # rows 96 floats apart
    assert torch.equal(kernels.lm_head_argmax(x, weight), kernels.lm_head_argmax(x.clone(), weight))
    with pytest.raises(RuntimeError, match="fp32 only"):
        kernels.lm_head_argmax(x.double(), weight.double())
    with pytest.raises(RuntimeError, match="contiguous weight"):
        kernels.lm_head_argmax(x, torch.randn(48, 300).t())
    with pytest.raises(RuntimeError, match=r"x \(S, K\)"):
        kernels.lm_head_argmax(x, torch.randn(300, 47))


def test_engine_fuses_only_on_the_cpu_fast_path(tiny_models):  # type: ignore[no-untyped-def]
    path = str(tiny_models["qwen3"])

    def fused(**kwargs) -> bool:  # type: ignore[no-untyped-def]
        llm = LLM(path, device="cpu", kv_cache_memory=2**20, **kwargs)
        fast = isinstance(llm.engine.worker.forward, FusedForward)
        fast_argmax = llm.engine.sampler.argmax_rows is not torch_argmax
        assert fast_argmax == fast
        assert (llm.engine.sampler.greedy_head is not None) == fast
        return fast

    assert fused()  # kernels="auto", fp32
    assert not fused(kernels="torch")
    assert not fused(dtype="bfloat16")


def test_greedy_head_steps_equal_the_logits_path(tiny_models):  # type: ignore[no-untyped-def]
    """A greedy job's steps take their tokens from the hidden states through the fused head;
    switched off, the same job samples from logits: the same tokens, and transformers'."""
    path = tiny_models["qwen3"]
    llm = LLM(str(path), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    sampler = llm.engine.sampler
    head = sampler.greedy_head
    assert head is not None
    calls: list[int] = []

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(len(hidden))
        return head(hidden)

    sampler.greedy_head = counted
    prompts = shared_prefix_prompts(10, seed=5)
    params = SamplingParams(max_tokens=7, temperature=0)
    fused = [o.output_token_ids for o in llm.generate(prompts, params)]
    assert sum(calls) == 10 * 7  # every token through the head
    sampler.greedy_head = None
    assert [o.output_token_ids for o in llm.generate(prompts, params)] == fused
    assert fused == hf_greedy(path, prompts, [7] * 10)


@pytest.mark.usefixtures("kernels_cannot_build")
def test_engine_keeps_pytorch_ops_when_the_kernels_cannot_build(tiny_models):  # type: ignore[no-untyped-def]
    prompts = shared_prefix_prompts(6, seed=4)
    with pytest.warns(UserWarning, match="element-wise kernels could not be built"):
        llm = LLM(str(tiny_models["qwen3"]), device="cpu", block_size=8, kv_cache_memory=8 * 2**20)
    assert not isinstance(llm.engine.worker.forward, FusedForward)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [o.output_token_ids for o in outs] == hf_greedy(tiny_models["qwen3"], prompts, [6] * 6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_fused_forward_matches_the_modules_forward(tiny_models, family):  # type: ignore[no-untyped-def]
    """The CPU fast path's flat loop (``fused_forward.py``) against the modules' plain forward,
    on every step of a job: prefill chunks, decode rows and steps mixing both; logits, and the
    hidden states the greedy head takes (every row of this job is greedy)."""
    llm = LLM(
        str(tiny_models[family]),
        device="cpu",
        block_size=8,
        kv_cache_memory=8 * 2**20,
        max_num_batched_tokens=48,
    )
    model, fused = llm.engine.worker.model, llm.engine.worker.forward
    assert isinstance(fused, FusedForward)
    step_rows: list[tuple[int, int]] = []  # (rows, rows that sample) of each step

    def compare(*args, hidden=False):  # type: ignore[no-untyped-def]
        torch.testing.assert_close(fused(*args), model(*args), rtol=1e-4, atol=1e-4)
        got = fused(*args, hidden=True)
        torch.testing.assert_close(got, model(*args, hidden=True), rtol=1e-4, atol=1e-4)
        step_rows.append((len(args[0]), len(args[4])))
        assert hidden  # greedy steps go through the greedy head
        return got

    llm.engine.runner.model = compare  # every step runs both forwards
    llm.generate(shared_prefix_prompts(8, seed=3), SamplingParams(max_tokens=5, temperature=0))
    assert any(rows > sampled for rows, sampled in step_rows)  # prefill rows
    assert any(rows == sampled > 1 for rows, sampled in step_rows)  # decode-only steps
