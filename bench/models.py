"""Model families on the CPU: a small random model of a family run as a batch job by
prefixbatch, against transformers' batched generate on the same model in the same run (and
vLLM's CPU backend when ``--vllm-python`` names a Python that has vllm), and against a peer
model that prefixbatch runs on the same job (for ``qwen3_moe``: a dense Qwen3 with the same
active parameters per token, to compare time per token).

Workloads (``bench/workloads.py``, token ids, greedy, EOS ignored so every engine makes the
same tokens): ``multilevel`` (system prompt > documents > questions: prefixes shared) and
``noshare`` (nothing shared).

Families (``--family``), each one entry of ``FAMILIES`` (its config, and optionally a peer's):

- ``qwen3_moe``: 8 layers, hidden 512, 8 heads of 64 (4 KV heads), 32 experts of 256 units,
  top-8 renormalised; its peer is a dense Qwen3 of intermediate 8 x 256.
- ``gemma3``: a Gemma 3 text model of 8 layers, hidden 512, 8 heads of 64 (4 KV heads),
  intermediate 2048 (GeGLU), five sliding-window layers (window 512) to one global, tied
  embeddings; no peer. The ``multilevel`` prompts (about 720 tokens) reach past the window.
- ``deepseek_v2``: DeepSeek-V2-Lite's shape scaled down: 8 layers, hidden 512, 8 heads with
  multi-head latent attention (``kv_lora_rank`` 256, rotary key 32, per-head nope keys and
  values of 64, the query from ``q_proj``), the first layer dense, then 32 routed experts of
  256 units (top-8, as ``--top-k``) and 2 shared ones. The KV cache holds 288 lanes a token
  and layer (against 8 x (96 + 64) = 1280 expanded); the row gives the blocks the budget buys.
  No peer.

Targets (the issue's): prefixbatch >= 3x transformers on the MoE job, and the MoE job's
seconds per output token within 2x of the dense peer's.

    python bench/models.py [--family qwen3_moe] [--scale 1] [--workloads multilevel,noshare]
        [--kv-cache-memory 1GiB] [--hf-batches 16,64] [--hf-experts grouped_mm,eager]
        [--no-hf] [--no-peer] [--vllm-python /path/to/venv/bin/python]
        [--layers 8 --experts 32 --top-k 8 --hidden 512 --expert-intermediate 256]
        [--window 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import machine, table, timed
from engine_vs_hf import hf_generate
from prefix_workloads import run_vllm
from workloads import ALL, Workload

from prefixbatch import LLM, SamplingParams

VOCAB = 40960  # the workloads draw token ids below 40000


@dataclass(frozen=True)
class FamilyJob:
    """A family's random model (a transformers config) and, optionally, a peer model that
    prefixbatch runs on the same job, named ``peer_name``; ``moe``: transformers runs it with
    each of ``--hf-experts`` (a dense model takes no ``experts_implementation``)."""

    config: Any
    peer: Any | None = None
    peer_name: str = ""
    moe: bool = False


def common_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields every family's job shares: sizes from the arguments, heads of 64."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64,
        max_position_embeddings=4096,
        initializer_range=0.05,
        eos_token_id=2,
        bos_token_id=1,
    )


def qwen3_moe(args: argparse.Namespace) -> FamilyJob:
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = {**common_fields(args), "tie_word_embeddings": False}
    moe = Qwen3MoeConfig(
        **common,
        intermediate_size=args.top_k * args.expert_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_intermediate,
        norm_topk_prob=True,
    )
    dense = Qwen3Config(**common, intermediate_size=args.top_k * args.expert_intermediate)
    return FamilyJob(moe, dense, "dense Qwen3, same active parameters", moe=True)


def gemma3(args: argparse.Namespace) -> FamilyJob:
    """Gemma 3 (text): every sixth layer global, the others sliding (``--window``); an MLP of
    4 x hidden; Gemma's tied embeddings."""
    from transformers import Gemma3TextConfig

    kinds = ("sliding_attention", "full_attention")
    config = Gemma3TextConfig(
        **common_fields(args),
        intermediate_size=4 * args.hidden,
        query_pre_attn_scalar=64,
        sliding_window=args.window,
        layer_types=[kinds[(i + 1) % 6 == 0] for i in range(args.layers)],
    )
    return FamilyJob(config)


def deepseek_v2(args: argparse.Namespace) -> FamilyJob:
    """DeepSeek-V2-Lite's shape (the module docstring): MLA over the compressed cache and
    DeepSeekMoE, ``--experts`` of ``--expert-intermediate`` units, ``--top-k`` of them."""
    from transformers import DeepseekV2Config

    common = {**common_fields(args), "tie_word_embeddings": False}
    common["num_key_value_heads"] = common["num_attention_heads"]
    config = DeepseekV2Config(
        **common,
        intermediate_size=4 * args.hidden,
        kv_lora_rank=256,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_intermediate,
        n_shared_experts=2,
        first_k_dense_replace=1,
    )
    return FamilyJob(config, moe=True)


FAMILIES: dict[str, Callable[[argparse.Namespace], FamilyJob]] = {
    "qwen3_moe": qwen3_moe,
    "gemma3": gemma3,
    "deepseek_v2": deepseek_v2,
}


def save_random_model(config: Any, path: Path) -> Path:
    """A random model of ``config`` (seed 0) saved the Hugging Face way, with a word-level
    tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))
    return path


def run_prefixbatch(llm: LLM, w: Workload) -> tuple[float, int]:
    """(seconds, output tokens) of the job, EOS ignored."""
    params = SamplingParams(max_tokens=w.max_tokens, temperature=0, ignore_eos=True)
    outs, secs = timed(lambda: llm.generate(w.prompts, params))
    return secs, sum(len(o.output_token_ids) for o in outs)


def run_transformers(
    path: Path, w: Workload, batches: list[int], experts: list[str] | None
) -> tuple[float, int, str]:
    """transformers' best (seconds, tokens, configuration) over batch sizes and, for a
    mixture-of-experts model, experts implementations (its MoE forward: ``grouped_mm``, the
    default, ``batched_mm``, ``eager``; None for a dense model)."""
    from transformers import AutoModelForCausalLM

    best: tuple[float, int, str] | None = None
    requests = [(p, w.max_tokens) for p in w.prompts]
    for impl in experts or [None]:
        options = {} if impl is None else {"experts_implementation": impl}
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, **options
        ).eval()
        for batch in batches:
            made, secs = timed(lambda b=batch, m=model: hf_generate(m, requests, b, [2], True))
            name = f"batch {batch}" if impl is None else f"{impl}, batch {batch}"
            print(f"  transformers {name}: {secs:.1f}s", flush=True)
            if best is None or secs / made < best[0] / best[1]:
                best = (secs, made, name)
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILIES))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workloads", default="multilevel,noshare")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--hf-batches", default="16,64")
    parser.add_argument("--hf-experts", default="grouped_mm,eager")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--vllm-python")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-intermediate", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)  # gemma3's sliding window
    args = parser.parse_args()
    print(f"machine: {machine()}")
    job = FAMILIES[args.family](args)
    print(f"model: {args.family} {job.config.to_diff_dict()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_model(job.config, Path(tmp) / args.family)
        peer_path = None
        if job.peer is not None and not args.no_peer:
            peer_path = save_random_model(job.peer, Path(tmp) / "peer")
        llm = LLM(str(path), kv_cache_memory=args.kv_cache_memory)
        peer = (
            None if peer_path is None else LLM(str(peer_path), kv_cache_memory=args.kv_cache_memory)
        )
        for engine in (llm, peer):
            if engine is not None:  # warm-up: kernels built or loaded
                engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
        for key in args.workloads.split(","):
            w = ALL[key](args.scale)
            secs, tokens = run_prefixbatch(llm, w)
            row: dict[str, Any] = {
                "workload": w.name,
                "requests": len(w.prompts),
                "KV blocks": llm.engine.worker.num_blocks,
                "out tok": tokens,
                "prefixbatch s": f"{secs:.1f}",
                "prefixbatch tok/s": f"{tokens / secs:.1f}",
            }
            if peer is not None:
                peer_secs, peer_tokens = run_prefixbatch(peer, w)
                row["peer s"] = f"{peer_secs:.1f}"
                row["s/token vs peer"] = f"{secs / tokens / (peer_secs / peer_tokens):.2f}x"
            if not args.no_hf:
                batches = [int(b) for b in args.hf_batches.split(",")]
                experts = args.hf_experts.split(",") if job.moe else None
                hf_secs, made, best = run_transformers(path, w, batches, experts)
                row["transformers s"] = f"{hf_secs:.1f} ({best})"
                row["vs transformers"] = f"{hf_secs / made / (secs / tokens):.2f}x"
            if args.vllm_python:
                try:
                    up, vllm_secs = run_vllm(args.vllm_python, path, w, llm.engine.kv_bytes)
                except subprocess.CalledProcessError as e:  # vLLM's CPU backend may not run it
                    last = (e.stderr or "").strip().splitlines()[-1:] or ["no output"]
                    row["vLLM s"], row["vs vLLM"] = f"failed: {last[0][:120]}", "-"
                else:
                    made = len(w.prompts) * w.max_tokens
                    row["vLLM s"] = f"{vllm_secs:.1f} (start-up {up:.0f})"
                    row["vs vLLM"] = f"{vllm_secs / made / (secs / tokens):.2f}x"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if job.peer is not None and not args.no_peer:
        print(f"peer: {job.peer_name}")
    print(table(rows))


if __name__ == "__main__":
    main()
