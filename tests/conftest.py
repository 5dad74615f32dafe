"""Shared fixtures: tiny random checkpoints saved the Hugging Face way, with a word-level
tokenizer, so engine tests need no download and run in seconds."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton kernels run on the CPU through its interpreter. The switch is read when a kernel is
# decorated, so it is set before any test module imports triton (torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 512
EOS = 2
HEARTBEAT_S = 50.0  # a line at least this often, even inside one long test (CI watches output)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """While a test runs longer than ``HEARTBEAT_S``, say so on the terminal every
    ``HEARTBEAT_S`` (output capture set aside for the line, as pytest does for its own)."""
    plugins = item.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is None or capture is None:  # -p no:terminal or --capture=no: nothing to do
        return (yield)
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            line = f"[still running {item.nodeid}: {time.monotonic() - start:.0f} s]"
            with capture.global_and_fixture_disabled():
                reporter.ensure_newline()
                reporter.write_line(line)

    threading.Thread(target=beat, name="test-heartbeat", daemon=True).start()
    try:
        return (yield)
    finally:
        done.set()


# The test vocabulary, by id: what save_tokenizer writes and the GGUF writers list.
TOKENS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, VOCAB))]


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
        "{% if add_generation_prompt %}w5{% endif %}"
    )
    fast.save_pretrained(str(path))


def tiny_config(family: str):  # type: ignore[no-untyped-def]
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=EOS,
        bos_token_id=1,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    if family == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if family == "llama3":
        return LlamaConfig(
            **common,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
    if family == "mistral":
        return MistralConfig(**common, sliding_window=4096)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32)
    if family.startswith("phi3"):
        return phi3_config(family, common)
    if family == "gemma2":  # windows of 12 (inside blocks of 8), soft-caps that bend
        return Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=12,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    if family == "gemma3":  # a global layer between sliding ones, linear rope scaling
        return Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            head_dim=32,
            query_pre_attn_scalar=48,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=4.0,
        )
    if family in MOE_FAMILIES:
        return tiny_moe_config(family, common)
    if family == "gpt_oss":
        return gpt_oss_config(common)
    if family.startswith("deepseek"):
        return deepseek_config(family, common)
    raise ValueError(family)


def deepseek_config(family: str, common: dict):  # type: ignore[no-untyped-def,type-arg]
    """DeepSeek's shapes: MLA with a latent of 32 lanes, a rotary key of 16, per-head nope keys
    of 16 and values of 24; layer 0 dense, then 8 routed experts of 32 units (top-3) in 4
    groups of which 2 are kept, and shared experts. ``deepseek_v2``: V2-Lite's q_proj, softmax
    routing (group_limited_greedy), 2 shared experts, interleaved rope. ``deepseek_v3``: the
    low-rank query, sigmoid routing with a correction bias, renormalised, 1 shared expert,
    YaRN with ``mscale_all_dim`` (factor 4 past 64 positions). ``deepseek_v3-flat``: V3 with
    ``rope_interleave`` off."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = {**common, "num_key_value_heads": common["num_attention_heads"]}
    mla = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
               n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
               first_k_dense_replace=1, n_group=4, topk_group=2)  # fmt: skip
    if family == "deepseek_v2":
        return DeepseekV2Config(
            **common, **mla, q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.5,
            topk_method="group_limited_greedy", norm_topk_prob=False,
        )  # fmt: skip
    return DeepseekV3Config(
        **{**common, "max_position_embeddings": 256}, **mla, q_lora_rank=48, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=family == "deepseek_v3",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    )  # fmt: skip


def gpt_oss_config(common: dict):  # type: ignore[no-untyped-def,type-arg]
    """gpt-oss's shape: sliding (window 12, inside blocks of 8) and global layers alternating,
    YaRN (factor 4 past 64 positions), 4 experts of 32 units, top-2, a SwiGLU limit low enough
    to clamp."""
    from transformers import GptOssConfig

    return GptOssConfig(
        **{**common, "intermediate_size": 32, "max_position_embeddings": 256}, head_dim=16,
        sliding_window=12, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.6,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64,
                         "rope_theta": 150000.0},
    )  # fmt: skip


# Mixture-of-experts families: 8 experts, top-2 or top-3 (Mixtral: 4 experts, top-2), and for
# Qwen-MoE dense layers between sparse ones (``mlp_only_layers``, ``decoder_sparse_step``).
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def tiny_moe_config(family: str, common: dict):  # type: ignore[no-untyped-def,type-arg]
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "qwen2_moe":  # layers 1 and 3 sparse, with the shared expert and its gate
        return Qwen2MoeConfig(
            **{**common, "num_hidden_layers": 4, "intermediate_size": 96}, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
        )  # fmt: skip
    if family == "qwen3_moe":  # layer 1 dense
        return Qwen3MoeConfig(
            **{**common, "intermediate_size": 96}, num_experts=8, num_experts_per_tok=3,
            moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1], head_dim=32,
        )  # fmt: skip
    if family == "mixtral":
        return MixtralConfig(**{**common, "intermediate_size": 32}, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=None)  # fmt: skip
    if family == "olmoe":  # q/k norms over all heads, and the qkv clamp
        return OlmoeConfig(**{**common, "intermediate_size": 32}, num_experts=8,
                           num_experts_per_tok=2, clip_qkv=1.0, pad_token_id=0)  # fmt: skip
    raise ValueError(family)


def phi3_config(family: str, common: dict):  # type: ignore[no-untyped-def]
    """``phi3``: Phi-4-mini's shape (LongRoPE, 3/4 of each 16-dim head rotated, tied
    embeddings), its context all within ``original_max_position_embeddings`` (the short factors
    run, unscaled); ``phi3-long``: Phi-3-mini-128k's (LongRoPE past 32 of 1024 positions: an
    attention factor of sqrt(2); whole heads); ``phi3-4k``: Phi-3-mini-4k's (no scaling, a
    sliding window shorter than the context)."""
    from transformers import Phi3Config

    common = {**common, "pad_token_id": 0}
    if family == "phi3-4k":
        return Phi3Config(**common, sliding_window=48)
    rng = random.Random(family)
    if family == "phi3":
        common = {**common, "tie_word_embeddings": True, "original_max_position_embeddings": 1024}
        partial = 0.75
    else:
        common = {**common, "original_max_position_embeddings": 32}
        partial = 1.0
    rotary_half = int(16 * partial) // 2
    rope = {
        "rope_type": "longrope",
        "short_factor": [rng.uniform(1.0, 1.5) for _ in range(rotary_half)],
        "long_factor": [rng.uniform(1.0, 8.0) for _ in range(rotary_half)],
    }
    return Phi3Config(**common, partial_rotary_factor=partial, rope_scaling=rope)


def make_tiny_model(path: Path, family: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    if family.startswith("gemma"):  # (1 + w) norms start at w = 0: random w tests them
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, std=0.3)
    if family == "gpt_oss":  # sinks from far below to above the scores: they bind
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                torch.nn.init.normal_(p, std=2.0)
    if family.startswith("deepseek"):  # a correction bias that changes which experts win
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                torch.nn.init.normal_(b, std=0.1)
    model.save_pretrained(str(path))
    save_tokenizer(path)
    return path


@pytest.fixture
def kernels_cannot_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every C++ kernel build fails (the cache directory is a file) for this test; builds
    already loaded are forgotten before and after."""
    from prefixbatch.execution import native_build

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(native_build, "cache_root", lambda: blocker)
    native_build.build_extension.cache_clear()
    yield
    native_build.build_extension.cache_clear()


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    return {f: make_tiny_model(root / f, f) for f in MOE_FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        f: make_tiny_model(root / f, f)
        for f in ("llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
    }


def shared_prefix_prompts(
    n: int,
    seed: int = 0,
    prefixes: int = 3,
    prefix_len: int = 40,
) -> list[list[int]]:
    """``n`` prompts: a few long shared prefixes with short distinct suffixes, shuffled, plus
    some unshared prompts; mixed lengths."""
    rng = random.Random(seed)
    heads = [[rng.randrange(3, VOCAB) for _ in range(prefix_len + 7 * i)] for i in range(prefixes)]
    prompts = []
    for i in range(n):
        suffix = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 30))]
        prompts.append(suffix if i % 4 == 3 else heads[i % prefixes] + suffix)
    rng.shuffle(prompts)
    return prompts


def nested_prompts(
    rng: random.Random, system: int, doc: int, docs: int, per_doc: int, vocab: tuple[int, int]
) -> list[list[int]]:
    """System prompt > ``docs`` documents > ``per_doc`` 5-token questions each, in order."""
    lo, hi = vocab
    head = [rng.randrange(lo, hi) for _ in range(system)]
    bodies = [[rng.randrange(lo, hi) for _ in range(doc)] for _ in range(docs)]
    return [
        head + d + [rng.randrange(lo, hi) for _ in range(5)] for d in bodies for _ in range(per_doc)
    ]


def dense_attention(q, k_pool, v_pool, step, scale, attn=None):  # type: ignore[no-untyped-def]
    """Every sequence's whole context gathered by its block table, causal softmax with the offset
    ``context_len - q_len``, in float64 -> (T, H, D) float64; with ``attn`` (a
    ``LayerAttention``), only each query's last ``attn.window`` positions, soft-capped scores
    and the sinks as one more logit per head in the softmax (transformers' gpt-oss: a column
    that attends no value). Ignores the levels: the plain definition every attention path is
    checked against."""
    window = attn.window if attn is not None else None
    softcap = attn.softcap if attn is not None else None
    sinks = attn.sinks if attn is not None else None
    out = torch.empty(*q.shape[:2], v_pool.shape[-1], dtype=torch.float64)  # (T, H, Dv)
    g = q.shape[1] // k_pool.shape[1]
    bs = step.block_size
    for s in step.seqs:
        pos = torch.arange(s.context_len)
        slots = torch.tensor(s.block_table)[pos // bs] * bs + pos % bs
        k = k_pool.double().cpu()[slots].repeat_interleave(g, 1)  # (L, H, D)
        v = v_pool.double().cpu()[slots].repeat_interleave(g, 1)
        qs = q.double().cpu()[s.q_start : s.q_start + s.q_len]  # (n, H, D)
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(s.q_len)[:, None] + s.context_len - s.q_len
        hidden = pos[None, :] > q_pos
        if window is not None:
            hidden |= pos[None, :] <= q_pos - window
        scores = scores.masked_fill(hidden, float("-inf"))
        if sinks is not None:  # (H, n, L + 1): the sink column, dropped after the softmax
            sink = sinks.double().cpu()[:, None, None].expand(-1, s.q_len, 1)
            probs = torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[s.q_start : s.q_start + s.q_len] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out


def record_steps(backend: Any) -> list[Any]:
    """The ``AttentionStep`` of every step ``backend`` stages from now on, in order."""
    steps: list[Any] = []
    stage = backend.stage
    backend.stage = lambda step, *a: steps.append(step) or stage(step, *a)
    return steps


def expected_greedy(
    paths: dict[str, Path], workload: Callable[[bool], tuple[list[list[int]], list[Any]]]
) -> Callable[[str, bool], list[list[int]]]:
    """(family, short) -> transformers' greedy tokens of ``workload(short)`` (prompts and
    ``SamplingParams``) on the checkpoint ``paths[family]``, computed once each."""

    @cache
    def greedy(family: str, short: bool) -> list[list[int]]:
        prompts, params = workload(short)
        return hf_greedy(paths[family], prompts, [p.max_tokens for p in params])

    return greedy


def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Hugging Face transformers' greedy continuation of each prompt, one at a time (no padding),
    stopping at EOS like the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p, m in zip(prompts, max_tokens):
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=m,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=EOS,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def gguf_header(writer: Any, config: dict[str, Any]) -> None:
    """The model fields every llama.cpp GGUF header has, from a transformers config's dict:
    context, sizes, layers, heads, RMSNorm epsilon."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def finish_gguf(writer: Any) -> None:
    """Write a GGUF file's header, key-values and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
