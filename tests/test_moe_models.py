"""The mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE) through the whole
engine against transformers' greedy output, token for token in fp32, on every CPU path: the
plain PyTorch reference (experts by grouped GEMMs, cascade attention on every group), the CPU
fast path (compiled attention, fused forward, repacked experts) and the Triton kernels under
the interpreter (attention and the fused experts kernel). Every run shares nested prefixes and
asks for two choices of some requests, and preempts under a tiny KV budget (the
interpreter's run is kept short: it is slow)."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import MOE_FAMILIES, expected_greedy, nested_prompts, record_steps, tiny_config
from prefixbatch import LLM, SamplingParams
from prefixbatch.errors import ModelNotFoundError
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.triton_backend import TritonBackend, triton_available
from prefixbatch.execution.models.fused_forward import FusedForward
from prefixbatch.execution.models.loader import build_model
from prefixbatch.execution.models.moe_decoder import MoEConfig, SparseMoeBlock
from prefixbatch.execution.models.olmoe import OlmoeModelConfig
from prefixbatch.execution.models.registry import family_named
from prefixbatch.execution.moe.cpu_experts import CpuExperts
from prefixbatch.execution.moe.experts import grouped_experts
from prefixbatch.loading.model_config import normalise, read_model_config
from prefixbatch.loading.model_source import ModelSource

FAMILIES = list(MOE_FAMILIES)

# The CPU paths of every family's parity test: the plain PyTorch reference, the CPU fast paths
# (compiled attention and experts kernels), the Triton kernels under the interpreter.
CPU_PATHS: dict[str, dict[str, Any]] = {
    "torch": {"kernels": "torch"},
    "cpu": {},
    "triton": {"attention_backend": "triton"},
}
MODES = {
    "torch": {**CPU_PATHS["torch"], "cascade_min_prefix": 0},
    "cpu": CPU_PATHS["cpu"],
    "triton": {**CPU_PATHS["triton"], "cascade_min_prefix": 0},
}


def short_run(mode: str) -> bool:
    """Whether ``mode`` runs the short workload (Triton's interpreter is slow); skips the test
    where triton is not installed."""
    if mode == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    return mode == "triton"


def greedy_parity(
    path: Path,
    prompts: list[list[int]],
    params: list[SamplingParams],
    expected: list[list[int]],
    kv_cache_memory: int,
    **engine: Any,
) -> tuple[LLM, list[Any]]:
    """Run ``prompts`` greedily on the checkpoint ``path`` (blocks of 8, prefill chunks of 48,
    ``engine`` settings) and check every choice against transformers' ``expected`` tokens,
    the shared prefixes run as levels (at least 3) and preemption (a KV pool small enough
    that decode growth preempts). Returns the engine and the ``AttentionStep`` of each step."""
    llm = LLM(
        str(path),
        device="cpu",
        block_size=8,
        kv_cache_memory=kv_cache_memory,
        max_num_batched_tokens=48,
        **engine,
    )
    steps = record_steps(llm.engine.backend)
    outs = llm.generate(prompts, params)
    for out, want, p in zip(outs, expected, params):
        assert [c.token_ids for c in out.outputs] == [want] * p.n
    stats = llm.engine.stats
    assert stats.groups >= 3  # the system prompt and both documents were shared levels
    assert stats.preemptions > 0
    return llm, steps


def check_experts_kernel(experts: Any, mode: str) -> None:
    """The experts kernel each CPU path runs: the grouped PyTorch reference, the compiled CPU
    kernel (CI has a compiler), the Triton kernel."""
    if mode == "torch":
        assert experts.kernel is grouped_experts
    elif mode == "cpu":
        assert isinstance(experts.kernel, CpuExperts)
    else:
        assert experts.kernel.__name__ == "triton_experts"


@cache
def workload(short: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """A system prompt > 2 documents > questions, and prompts that share nothing; every third
    request asks for 2 choices. ``short``: 5 tokens of output (the 21-token prompts grow into a
    fourth block of 8), else 12 to 16."""
    rng = random.Random(7)
    size = 8 if short else 16
    prompts = nested_prompts(rng, size, size, docs=2, per_doc=2, vocab=(3, 500))
    prompts += [[rng.randrange(3, 500) for _ in range(n)] for n in ((9,) if short else (9, 21))]
    params = [
        SamplingParams(max_tokens=5 if short else 12 + i % 5, temperature=0, n=1 + (i % 3 == 0))
        for i in range(len(prompts))
    ]
    return prompts, params


@pytest.fixture(scope="module")
def expected(moe_models):  # type: ignore[no-untyped-def]
    return expected_greedy(moe_models, workload)


def kv_bytes(family: str, blocks: int) -> int:
    """Bytes of ``blocks`` KV blocks of 8 tokens for the family's tiny model (fp32)."""
    cfg = tiny_config(family)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return blocks * 2 * cfg.num_hidden_layers * 8 * cfg.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(moe_models, expected, family, mode):  # type: ignore[no-untyped-def]
    short = short_run(mode)
    prompts, params = workload(short)
    llm, _ = greedy_parity(
        moe_models[family],
        prompts,
        params,
        expected(family, short),
        kv_bytes(family, 6 if short else 16),  # a few sequences at a time
        **MODES[mode],
    )
    worker = llm.engine.worker
    experts = next(m for m in worker.model.modules() if isinstance(m, SparseMoeBlock)).experts
    check_experts_kernel(experts, mode)
    if mode == "torch":
        assert not isinstance(worker.forward, FusedForward)
    elif mode == "cpu":  # the fast path
        assert isinstance(worker.forward, FusedForward)
        assert isinstance(llm.engine.backend, CpuBackend)
    else:
        assert isinstance(llm.engine.backend, TritonBackend)


def checkpoint_config(family: str):  # type: ignore[no-untyped-def]
    config = tiny_config(family)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def test_families_read_their_expert_fields():
    qwen2 = normalise(checkpoint_config("qwen2_moe"))
    assert isinstance(qwen2, MoEConfig) and qwen2.architecture == "qwen2_moe"
    assert qwen2.sparse_layers == (1, 3)  # decoder_sparse_step 2 of 4 layers
    assert (qwen2.shared_expert_intermediate_size, qwen2.attention_bias) == (48, True)
    assert (qwen2.num_experts, qwen2.top_k, qwen2.renormalize) == (8, 2, False)
    qwen3 = normalise(checkpoint_config("qwen3_moe"))
    assert (qwen3.sparse_layers, qwen3.top_k, qwen3.renormalize) == ((0, 2), 3, True)
    assert (qwen3.expert_intermediate_size, qwen3.intermediate_size) == (32, 96)
    mixtral = normalise(checkpoint_config("mixtral"))
    assert (mixtral.sparse_layers, mixtral.renormalize, mixtral.num_experts) == ((0, 1, 2), True, 4)
    olmoe = normalise(checkpoint_config("olmoe"))
    assert isinstance(olmoe, OlmoeModelConfig) and olmoe.clip_qkv == 1.0
    config = checkpoint_config("mixtral")
    config.sliding_window = 64
    assert normalise(config).max_position == 64  # as Mistral: capped at the window


def load(path: Path, family: str) -> dict[str, torch.Tensor]:
    source = ModelSource(path)
    model = build_model(
        family_named(family),
        read_model_config(source),
        source.weights(),
        torch.device("cpu"),
        torch.float32,
    )
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_per_expert_and_stacked_checkpoints_load_the_same(moe_models, tmp_path, family):  # type: ignore[no-untyped-def]
    """``save_pretrained`` writes one tensor per expert (Mixtral: block_sparse_moe ... w1, w3,
    w2); with ``save_original_format=False`` transformers 5 writes its stacked tensors."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(moe_models[family]), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path), save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())
    per_expert, stacked = load(moe_models[family], family), load(tmp_path, family)
    assert per_expert.keys() == stacked.keys()
    assert all(torch.equal(per_expert[name], stacked[name]) for name in per_expert)
    gate_up = per_expert["layers.1.mlp.experts.gate_up_proj"]  # (E, 2I, H)
    hf_experts = hf.model.layers[1].mlp.experts
    assert torch.equal(gate_up, hf_experts.gate_up_proj.detach())


class EditedSource(ModelSource):
    """A checkpoint directory with one tensor dropped or cut."""

    def __init__(self, path: Path, name: str, cut: bool) -> None:
        super().__init__(path)
        object.__setattr__(self, "edit", (name, cut))

    def weights(self):  # type: ignore[no-untyped-def]
        name, cut = self.edit  # type: ignore[attr-defined]
        for n, t in ModelSource(self.path).weights():
            if n != name:
                yield n, t
            elif cut:
                yield n, t[:-1]


@pytest.mark.parametrize(
    ("name", "cut", "message"),
    [
        ("model.layers.0.mlp.experts.5.up_proj.weight", False,
         "no tensor for layers.0.mlp.experts.gate_up_proj"),
        ("model.layers.2.mlp.experts.1.down_proj.weight", True,
         r"experts.1.down_proj.weight': shape \(63, 32\) where \(64, 32\)"),
    ],
)  # fmt: skip
def test_a_missing_or_misshapen_expert_is_a_clear_error(moe_models, name, cut, message):  # type: ignore[no-untyped-def]
    source = EditedSource(moe_models["qwen3_moe"], name, cut)
    with pytest.raises(ModelNotFoundError, match=message):
        build_model(
            family_named("qwen3_moe"),
            read_model_config(source),
            source.weights(),
            torch.device("cpu"),
            torch.float32,
        )
