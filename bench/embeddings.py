"""Embedding throughput: ``LLM.embed`` against plain transformers on the same passages, in the
same run, on the default model (SmolLM2-135M, fp32, last-token pooling, L2-normalised).

Workload: ``--passages`` passages of 100-300 tokens (uniform), each after the same 30-token
instruction (as retrieval indexing with an instruction-tuned embedder sends them: Qwen3-Embedding's
"Instruct: ...\\nQuery:" prefix). Token ids are drawn at random from the vocabulary's ordinary
range (the work does not depend on which ids they are).

transformers' best setting here: ``AutoModel`` (no LM head) in fp32 under
``torch.inference_mode``, passages sorted by length and right-padded per batch (least padding),
the last real token's ``last_hidden_state`` pooled; batch sizes from ``--hf-batches``, the
best reported. Throughput counts prompt tokens (instruction included) per second. The engine's
embeddings are checked against transformers' (max abs difference, printed).

    python bench/embeddings.py [--passages 20000] [--hf-batches 8,32,64] [--kv-cache-memory 2GiB]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from common import machine, table, timed

from prefixbatch import LLM

INSTRUCTION = 30
LOW, HIGH = 100, 300


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = range(1000, min(vocab, 40_000))
    instruction = [rng.choice(ids) for _ in range(INSTRUCTION)]
    return [
        instruction + [rng.choice(ids) for _ in range(rng.randint(LOW, HIGH))] for _ in range(n)
    ]


def hf_embed(model: torch.nn.Module, prompts: list[list[int]], batch: int) -> np.ndarray:
    """Sorted by length, right-padded per batch, the last real token pooled, normalised."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            longest = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            mask = torch.zeros(len(idx), longest, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[row, : len(prompts[i])] = 1
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(dim=1) - 1
            pooled = states[torch.arange(len(idx)), last]
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def row(run: str, batch: object, seconds: float, tokens: int, engine_s: float) -> dict[str, str]:
    """A table row; ``ratio``: the engine's tokens per second over this run's."""
    return {
        "run": run,
        "batch": str(batch),
        "s": f"{seconds:.1f}",
        "tok/s": f"{tokens / seconds:.0f}",
        "ratio": f"{seconds / engine_s:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--hf-batches", default="8,32,64", help="transformers batch sizes")
    parser.add_argument("--kv-cache-memory", default="2GiB")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    llm = LLM(kv_cache_memory=args.kv_cache_memory)
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(llm.engine.loaded.source.path), dtype=torch.float32).eval()
    prompts = workload(args.passages, llm.engine.limits.vocab_size)
    tokens = sum(map(len, prompts))
    llm.embed(prompts[:4], use_tqdm=False)  # warm-up (kernel loads)
    got, engine_s = timed(lambda: np.stack(llm.embed(prompts, use_tqdm=False)))
    saved = llm.engine.stats.prefill_tokens_saved
    rows = [row("prefixbatch", "-", engine_s, tokens, engine_s)]
    best = None
    for batch in (int(b) for b in args.hf_batches.split(",")):
        expected, hf_s = timed(lambda: hf_embed(hf, prompts, batch))  # noqa: B023
        best = hf_s if best is None else min(best, hf_s)
        rows.append(row("transformers", batch, hf_s, tokens, engine_s))
    assert best is not None
    error = float(np.abs(got - expected).max())
    print(f"{len(prompts)} passages, {tokens} prompt tokens, {saved} prefill tokens saved by "
          f"sharing; max abs difference from transformers: {error:.2e}")  # fmt: skip
    print(table(rows))
    print(f"prefixbatch / best transformers: {best / engine_s:.2f}x tokens per second")


if __name__ == "__main__":
    main()
