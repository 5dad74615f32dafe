"""gpt-oss against transformers: greedy tokens through the engine on every CPU path (the plain
PyTorch reference, the CPU fast paths: compiled attention and experts kernels, and the Triton
kernels under the interpreter) with nested shared prefixes longer than the sliding window read
as prefix levels, preemption and n > 1; the logits themselves; the biased, clamped experts in
every kernel against transformers' ``GptOssExperts``; MXFP4 checkpoints dequantised at load
(against transformers' own dequantisation); the config fields; GGUF refused clearly."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
import torch
from test_gemma import levels_against_windows
from test_moe_models import CPU_PATHS, check_experts_kernel, greedy_parity, load, short_run

from conftest import (
    VOCAB,
    hf_greedy,
    make_tiny_model,
    nested_prompts,
    tiny_config,
)
from prefixbatch import LLM, SamplingParams
from prefixbatch.errors import UnsupportedModelError
from prefixbatch.execution.attention.native import CpuBackend
from prefixbatch.execution.attention.shared_prefix import SharedPrefixBackend
from prefixbatch.execution.attention.step import AttentionStep, SeqStep
from prefixbatch.execution.attention.triton_backend import TritonBackend, triton_available
from prefixbatch.execution.models.gpt_oss import GptOssConfig, GptOssExperts
from prefixbatch.execution.models.registry import family_for_gguf
from prefixbatch.execution.moe.kernel_choice import use_experts_kernel
from prefixbatch.execution.moe.mxfp4 import dequantize_mxfp4
from prefixbatch.execution.moe.routing import select_experts, select_top_logits
from prefixbatch.loading.model_config import normalise

FAMILIES = ["gpt_oss"]
WINDOW = 12  # conftest's tiny config


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gpt-oss") / "gpt_oss", "gpt_oss")


@cache
def workload(short: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """A system prompt > 2 documents > questions (levels of 16 tokens, longer than the window),
    and prompts that share nothing; every third request asks for 2 choices. ``short``: 5 tokens
    of output (the 37-token prompts grow into a sixth block of 8), else 10 to 14."""
    rng = random.Random(11)
    prompts = nested_prompts(rng, 16, 16, docs=2, per_doc=2, vocab=(3, VOCAB))
    prompts += [[rng.randrange(3, VOCAB) for _ in range(n)] for n in ((9,) if short else (9, 30))]
    params = [
        SamplingParams(max_tokens=5 if short else 10 + i % 5, temperature=0, n=1 + (i % 3 == 0))
        for i in range(len(prompts))
    ]
    return prompts, params


def kv_bytes(blocks: int) -> int:
    """Bytes of ``blocks`` KV blocks of 8 tokens of the tiny model (3 layers, 2 KV heads of 16,
    fp32)."""
    return blocks * 2 * 3 * 8 * 2 * 16 * 4


@pytest.mark.parametrize("mode", CPU_PATHS)
def test_greedy_matches_transformers(gpt_oss, mode):  # type: ignore[no-untyped-def]
    short = short_run(mode)
    prompts, params = workload(short)
    expected = hf_greedy(gpt_oss, prompts, [p.max_tokens for p in params])
    llm, steps = greedy_parity(
        gpt_oss,
        prompts,
        params,
        expected,
        kv_bytes(7 if short else 14),  # decode growth preempts
        cascade_min_prefix=0,
        **CPU_PATHS[mode],
    )
    assert levels_against_windows(steps, WINDOW) == (True, True)
    experts = next(m for m in llm.engine.worker.model.modules() if isinstance(m, GptOssExperts))
    kind = {"torch": SharedPrefixBackend, "cpu": CpuBackend, "triton": TritonBackend}[mode]
    assert isinstance(llm.engine.backend, kind)
    check_experts_kernel(experts, mode)


def test_logits_match_transformers(gpt_oss):  # type: ignore[no-untyped-def]
    """A 40-token prompt as one prefill (past the window), every row's logits: sinks, YaRN,
    biases, the clamped experts."""
    from transformers import AutoModelForCausalLM

    rng = random.Random(9)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    llm = LLM(str(gpt_oss), device="cpu", block_size=8, kv_cache_memory=2**20)
    worker = llm.engine.worker
    step = AttentionStep.of((SeqStep(0, 40, 40, tuple(range(5))),), block_size=8)
    rows = torch.arange(40)
    got = worker.forward(
        torch.tensor(prompt), rows, worker.backend, worker.backend.prepare(step), rows
    )
    hf = AutoModelForCausalLM.from_pretrained(str(gpt_oss), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def hf_experts(seed: int = 0):  # type: ignore[no-untyped-def]
    """transformers' experts of the tiny config, random weights and biases, a limit that binds."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as HfExperts

    torch.manual_seed(seed)
    experts = HfExperts(tiny_config("gpt_oss"))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def ours(hf, names=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")):  # type: ignore[no-untyped-def]
    cfg = normalise(with_architecture(tiny_config("gpt_oss")))
    experts = GptOssExperts(cfg)
    for name in names:
        experts.weight_loader(getattr(experts, name), getattr(hf, name).detach(), None)
    return experts


@pytest.mark.parametrize("kernel", ["torch", "cpu", "triton"])
def test_experts_match_transformers_in_every_kernel(kernel):  # type: ignore[no-untyped-def]
    """The checkpoint layout (interleaved gate/up columns, (in, out) weights), the biases and
    the clamped SwiGLU, through the reference, the CPU fast path and the fused Triton kernel,
    routed as transformers' router routes (an expert with no token included)."""
    if kernel == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("triton is not installed")
    hf = hf_experts()
    experts = ours(hf)
    use_experts_kernel(experts, kernel)
    x = torch.randn(23, 64) * 3  # gate and up values past the limit of 0.6
    logits = torch.randn(23, 4)
    logits[:, 3] = -30.0  # expert 3 gets no token
    weights, ids = select_top_logits(logits, 2)
    with torch.inference_mode():
        expected = hf(x, ids, weights)
        got = experts(x, weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_router_takes_the_top_logits_then_their_softmax():
    logits = torch.randn(50, 8)
    weights, ids = select_top_logits(logits, 3)
    top, top_ids = logits.topk(3)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, top.softmax(-1))
    same, same_ids = select_experts(logits, 3, renormalize=True)
    assert torch.equal(ids, same_ids)
    torch.testing.assert_close(weights, same)
    with pytest.raises(ValueError, match="top_k 9"):
        select_top_logits(logits, 9)


def mxfp4_tensors(
    rng: torch.Generator, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks (..., G, 16) and scales (..., G) for rows of ``shape[-1]`` values,
    scales from 2^-3 to 2^2."""
    *rows, width = shape
    groups = width // 32
    blocks = torch.randint(0, 256, (*rows, groups, 16), generator=rng, dtype=torch.uint8)
    scales = torch.randint(124, 130, (*rows, groups), generator=rng, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_dequantisation_matches_transformers_and_the_spec():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4_tensors(torch.Generator().manual_seed(0), (3, 10, 64))
    got = dequantize_mxfp4(blocks, scales)  # (3, 10, 64)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (3, 64, 10)
    assert torch.equal(got, expected.transpose(1, 2))
    # By the spec: byte 0x1F holds two values, the low nibble's first (0xF: -6.0, 0x1: 0.5)
    one = torch.zeros(1, 16, dtype=torch.uint8)
    one[0, 0] = 0x1F
    values = dequantize_mxfp4(one, torch.tensor([128], dtype=torch.uint8))  # scale 2^1
    assert values[:2].tolist() == [-12.0, 1.0] and not values[2:].any()
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_mxfp4(blocks, scales[..., :1])


def test_an_mxfp4_checkpoint_loads_as_its_dequantised_weights(gpt_oss, tmp_path):  # type: ignore[no-untyped-def]
    """The tiny checkpoint with its experts replaced by random MXFP4 tensors (``*_blocks``,
    ``*_scales``, as gpt-oss ships them) loads into the same parameters as a plain checkpoint
    of transformers' dequantisation; a missing half is a clear error."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from prefixbatch.errors import ModelNotFoundError

    tensors = load_file(str(gpt_oss / "model.safetensors"))
    rng = torch.Generator().manual_seed(1)
    quantised, plain = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, rows, cols = tensors[name].shape  # transformers' (E, in, out)
        blocks, scales = mxfp4_tensors(rng, (e, cols, rows))  # rows of the out features
        del quantised[name]
        quantised[f"{name}_blocks"], quantised[f"{name}_scales"] = blocks, scales
        plain[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    dirs = {}
    for kind, weights in (("mxfp4", quantised), ("plain", plain)):
        dirs[kind] = tmp_path / kind
        shutil.copytree(gpt_oss, dirs[kind])
        save_file(weights, str(dirs[kind] / "model.safetensors"))
    loaded = {kind: load(path, "gpt_oss") for kind, path in dirs.items()}
    assert loaded["mxfp4"].keys() == loaded["plain"].keys()
    for name, value in loaded["plain"].items():
        assert torch.equal(loaded["mxfp4"][name], value), name
    del quantised["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(quantised, str(dirs["mxfp4"] / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="no tensor for layers.1.mlp.experts.down_proj"):
        load(dirs["mxfp4"], "gpt_oss")


def with_architecture(config):  # type: ignore[no-untyped-def]
    config.architectures = ["GptOssForCausalLM"]
    return config


def test_config_fields_and_gguf():
    cfg = normalise(with_architecture(tiny_config("gpt_oss")))
    assert isinstance(cfg, GptOssConfig) and cfg.architecture == "gpt_oss"
    assert cfg.layer_windows == (12, None, 12)  # sliding first, alternating
    assert (cfg.num_experts, cfg.top_k, cfg.swiglu_limit, cfg.swiglu_alpha) == (4, 2, 0.6, 1.702)
    assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.truncate) == ("yarn", 4.0, False)
    assert cfg.attention_bias and cfg.max_position == 256  # not capped at the window
    config = with_architecture(tiny_config("gpt_oss"))
    config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        normalise(config)
    with pytest.raises(UnsupportedModelError, match="'gpt_oss'.*Hugging Face checkpoint"):
        family_for_gguf("gpt_oss")
