"""DeepSeek-V2 and DeepSeek-V3 against transformers: greedy tokens through the engine with
multi-head latent attention over the compressed KV cache, on every CPU path (the plain PyTorch
reference; the CPU fast paths: the compiled attention kernels over the latent, packed
projections and the CPU experts kernel; the Triton attention and experts kernels under the
interpreter)
with nested shared prefixes read as prefix levels, preemption and n > 1; every row's logits
(V3 also with its rope not interleaved); the config fields; the KV pool sized by the
compressed bytes; the routers against transformers' and their edge cases; V3's
multi-token-prediction layers skipped at load."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_moe_models import (
    CPU_PATHS,
    check_experts_kernel,
    checkpoint_config,
    greedy_parity,
    short_run,
    workload,
)

from conftest import VOCAB, expected_greedy, make_tiny_model
from prefixbatch import LLM, SamplingParams
from prefixbatch.config import EngineConfig, KVLayout
from prefixbatch.errors import JobError
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.step import AttentionStep, SeqStep
from prefixbatch.execution.attention.triton_backend import TritonBackend
from prefixbatch.execution.kv_cache import KVCache
from prefixbatch.execution.kv_memory import kv_pool_blocks
from prefixbatch.execution.models.deepseek import DeepseekConfig, DeepseekMoeBlock, DeepseekRouter
from prefixbatch.execution.moe.grouped_routing import GroupedRouting, select_grouped_experts
from prefixbatch.loading.model_config import normalise

FAMILIES = ["deepseek_v2", "deepseek_v3"]
LATENT = 32 + 16  # kv_lora_rank + qk_rope_head_dim of the tiny configs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    return {f: make_tiny_model(root / f, f) for f in (*FAMILIES, "deepseek_v3-flat")}


@pytest.fixture(scope="module")
def expected(models):  # type: ignore[no-untyped-def]
    return expected_greedy(models, workload)


def kv_bytes(blocks: int) -> int:
    """Bytes of ``blocks`` KV blocks of 8 tokens of the tiny models: 3 layers of one latent
    of 48 lanes (the value inside it), fp32."""
    return blocks * 3 * 8 * LATENT * 4


@pytest.mark.parametrize("mode", CPU_PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(models, expected, family, mode):  # type: ignore[no-untyped-def]
    short = short_run(mode)
    prompts, params = workload(short)
    llm, steps = greedy_parity(
        models[family],
        prompts,
        params,
        expected(family, short),
        kv_bytes(6 if short else 14),  # decode growth preempts
        cascade_min_prefix=0,
        **CPU_PATHS[mode],
    )
    backend = llm.engine.backend
    assert any(step.levels for step in steps)  # shared prefixes were read as levels
    worker = llm.engine.worker
    assert worker.cache.value_in_key and worker.cache.k.shape[-2:] == (1, LATENT)
    experts = next(m for m in worker.model.modules() if isinstance(m, DeepseekMoeBlock)).experts
    check_experts_kernel(experts, mode)
    kind = {"torch": SharedPrefixBackend, "cpu": CpuBackend, "triton": TritonBackend}[mode]
    assert isinstance(backend, kind)  # cpu: the compiled attention kernels read the latent


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v3-flat"])
def test_logits_match_transformers(models, family):  # type: ignore[no-untyped-def]
    """A 40-token prompt as one prefill, every row's logits: MLA, its rope layout, YaRN's
    softmax scale (V3), the dense first layer and the routed and shared experts."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(9)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    llm = LLM(str(models[family]), device="cpu", block_size=8, kv_cache_memory=2**20)
    worker = llm.engine.worker
    step = AttentionStep.of((SeqStep(0, 40, 40, tuple(range(5))),), block_size=8)
    rows = torch.arange(40)
    got = worker.forward(
        torch.tensor(prompt), rows, worker.backend, worker.backend.prepare(step), rows
    )
    hf = AutoModelForCausalLM.from_pretrained(str(models[family]), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_config_fields():
    v2 = normalise(checkpoint_config("deepseek_v2"))
    assert isinstance(v2, DeepseekConfig) and v2.architecture == "deepseek_v2"
    assert (v2.q_lora_rank, v2.kv_lora_rank, v2.v_head_dim, v2.head_dim) == (None, 32, 24, 16)
    assert v2.sparse_layers == (1, 2) and v2.shared_expert_intermediate_size == 64
    assert v2.rope_interleave and v2.attention_scale == pytest.approx(32**-0.5)
    r = v2.routing
    assert (r.scoring, r.num_groups, r.top_groups, r.group_score) == ("softmax", 4, 2, "max")
    assert (r.top_k, r.renormalize, r.scaling) == (3, False, 1.5)
    greedy = checkpoint_config("deepseek_v2")
    greedy.topk_method = "greedy"
    assert normalise(greedy).routing.num_groups == 1  # type: ignore[attr-defined]
    greedy.topk_method = "noaux_tc"
    with pytest.raises(JobError, match="topk_method 'noaux_tc'"):
        normalise(greedy)
    fp8 = checkpoint_config("deepseek_v3")
    fp8.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(JobError, match="fp8-quantised DeepSeek checkpoint.*bf16"):
        normalise(fp8)
    v3 = normalise(checkpoint_config("deepseek_v3"))
    assert isinstance(v3, DeepseekConfig) and v3.q_lora_rank == 48
    r = v3.routing
    assert (r.scoring, r.group_score, r.renormalize, r.scaling) == ("sigmoid", "top2", True, 2.5)
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1.0  # mscale_all_dim 1, factor 4
    assert v3.attention_scale == pytest.approx(32**-0.5 * mscale**2)
    assert v3.rope.rope_type == "yarn" and v3.rope_interleave
    flat = normalise(checkpoint_config("deepseek_v3-flat"))
    assert not flat.rope_interleave  # type: ignore[attr-defined]


def test_the_kv_pool_holds_the_compressed_latent():
    """A budget gives an MLA model as many blocks as its latent (kv_lora_rank + rope lanes,
    one head, the value inside the key) allows: 56 * 4 / 48 times what every head's expanded
    K (nope + rope: 32 lanes) and V (24 lanes) would."""
    cfg = normalise(checkpoint_config("deepseek_v3"))
    budget = 2**20
    config = EngineConfig(device="cpu", block_size=8, kv_cache_memory=budget)
    blocks, per_block = kv_pool_blocks(config, cfg)
    assert per_block == 3 * 8 * LATENT * 4 and blocks == budget // per_block == 227
    expanded = KVCache.bytes_per_block(3, 8, KVLayout(cfg.num_heads, 32, 24), torch.float32)
    assert expanded == 3 * 8 * 4 * (32 + 24) * 4
    assert budget // expanded == 48 and blocks > 4.6 * (budget // expanded)


def test_multi_token_prediction_layers_are_not_loaded(models, tmp_path):  # type: ignore[no-untyped-def]
    """V3 checkpoints carry their MTP module as layer ``num_hidden_layers``: skipped."""
    src = models["deepseek_v3"]
    for name in src.iterdir():
        (tmp_path / name.name).symlink_to(name)
    (tmp_path / "model.safetensors").unlink()
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    llm = LLM(str(tmp_path), device="cpu", block_size=8, kv_cache_memory=2**20)
    assert len(llm.engine.worker.model.layers) == 3


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v2-greedy", "deepseek_v3"])
def test_routing_matches_transformers_routers(family):  # type: ignore[no-untyped-def]
    """Our router against transformers' (``DeepseekV2TopkRouter``, ``DeepseekV3TopkRouter``)
    on random hidden states: the same experts and weights (in any order)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = checkpoint_config(family.removesuffix("-greedy"))
    if family.endswith("greedy"):
        config.topk_method = "greedy"
    torch.manual_seed(3)
    v3 = family == "deepseek_v3"
    hf = (DeepseekV3TopkRouter if v3 else DeepseekV2TopkRouter)(config)
    with torch.no_grad():
        hf.weight.normal_(0, 1.0)
        if v3:
            hf.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(200, 64)
    _, hf_weights, hf_ids = hf(x)
    routing = normalise(config).routing  # type: ignore[attr-defined]
    bias = hf.e_score_correction_bias if v3 else None
    weights, ids = select_grouped_experts(x @ hf.weight.T, routing, bias)
    assert torch.equal(ids.sort(-1).values, hf_ids.sort(-1).values)
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))


def test_routing_edge_cases():
    # ties: every logit equal -> distinct experts, equal weights
    tied = GroupedRouting(top_k=3, num_groups=4, top_groups=2)
    weights, ids = select_grouped_experts(torch.zeros(5, 8), tied)
    assert all(len(set(row)) == 3 for row in ids.tolist())
    assert torch.allclose(weights, torch.full((5, 3), 1 / 8))
    # group limits: V2 keeps the group of the best expert; V3 ranks groups by their two best
    logits = torch.tensor([[5.0, -9.0, 4.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    v2 = GroupedRouting(top_k=2, num_groups=4, top_groups=1, group_score="max")
    assert sorted(select_grouped_experts(logits, v2)[1][0].tolist()) == [0, 1]
    v3 = GroupedRouting(top_k=2, scoring="sigmoid", num_groups=4, top_groups=1, group_score="top2")
    assert sorted(select_grouped_experts(logits, v3)[1][0].tolist()) == [2, 3]
    # the correction bias chooses, the unbiased scores weigh
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    one = GroupedRouting(top_k=1, scoring="sigmoid", scaling=2.0)
    weights, ids = select_grouped_experts(logits, one, bias)
    assert ids.tolist() == [[7]] and weights.tolist() == [[pytest.approx(2 * 0.5)]]
    # top_k == experts: every expert, renormalised weights summing to the scaling
    every = GroupedRouting(top_k=8, scoring="sigmoid", renormalize=True, scaling=2.5)
    weights, ids = select_grouped_experts(torch.randn(4, 8), every)
    assert torch.equal(ids.sort(-1).values, torch.arange(8).expand(4, 8))
    torch.testing.assert_close(weights.sum(-1), torch.full((4,), 2.5))
    # the kept groups must hold top_k experts; the experts must split into the groups
    with pytest.raises(ValueError, match="top_k 5 must be between 1 and the 4 experts kept"):
        select_grouped_experts(logits, GroupedRouting(top_k=5, num_groups=4, top_groups=2))
    with pytest.raises(ValueError, match="8 experts do not split into 3 groups"):
        select_grouped_experts(logits, GroupedRouting(top_k=1, num_groups=3))
    with pytest.raises(ValueError, match="3 of 2 expert groups"):
        GroupedRouting(top_k=1, num_groups=2, top_groups=3)


def test_bf16_keeps_the_router_in_fp32(models):  # type: ignore[no-untyped-def]
    """In bf16 the router's weight and correction bias stay fp32 (as transformers keeps them)
    and a batch runs."""
    llm = LLM(str(models["deepseek_v3"]), device="cpu", dtype="bfloat16", kv_cache_memory=2**20)
    router = next(m for m in llm.engine.worker.model.modules() if isinstance(m, DeepseekRouter))
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32  # type: ignore[union-attr]
    assert llm.engine.worker.cache.k.dtype == torch.bfloat16
    outs = llm.generate(
        [[5, 6, 7, 8]] * 2, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
