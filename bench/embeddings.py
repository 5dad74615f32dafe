"""Embedding and scoring throughput: ``LLM.embed`` (and the engine's score requests) against
plain transformers on the same prompts, in the same run, on the default model (SmolLM2-135M,
fp32, last-token pooling, L2-normalised; for scoring, its decoder under a one-label score head).

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

Scoring (``--score``): ``--queries`` queries, each with ``--documents`` documents (a reranker's
1-to-N request), every pair ``instruction + query + document``: the 30-token instruction, a
query of 20-40 tokens and a document of 100-300. The checkpoint is the default model saved as
transformers' ``LlamaForSequenceClassification`` with a random one-label ``score`` head (the
work is the decoder's either way); the engine runs the pairs as score requests (the query's
tokens shared by its documents), transformers its ``ForSequenceClassification`` forward,
sorted by length and right-padded per batch, sigmoid of the logit. Scores are checked against
transformers' (max abs difference, printed).

    python bench/embeddings.py --score [--queries 200] [--documents 50] [--hf-batches 8,32,64]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from common import machine, table, timed

from prefixbatch import LLM, SamplingParams
from prefixbatch.config import EngineConfig, parse_memory
from prefixbatch.engine import LLMEngine
from prefixbatch.loading.model_source import resolve_model
from prefixbatch.outputs import Request
from prefixbatch.pooling import EmbeddingParams
from prefixbatch.scoring import ScoreParams

INSTRUCTION = 30
LOW, HIGH = 100, 300


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ids = range(1000, min(vocab, 40_000))
    instruction = [rng.choice(ids) for _ in range(INSTRUCTION)]
    return [
        instruction + [rng.choice(ids) for _ in range(rng.randint(LOW, HIGH))] for _ in range(n)
    ]


def padded_batches(
    prompts: list[list[int]], batch: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """transformers' best batching here: prompts sorted by length, ``batch`` at a time, right-
    padded with id 0: (their indices, input_ids (B, longest), attention_mask (B, longest))."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        longest = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), longest, dtype=torch.long)
        mask = torch.zeros(len(idx), longest, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[row, : len(prompts[i])] = 1
        yield idx, ids, mask


def hf_embed(model: torch.nn.Module, prompts: list[list[int]], batch: int) -> np.ndarray:
    """Sorted by length, right-padded per batch, the last real token pooled, normalised."""
    out = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for idx, ids, mask in padded_batches(prompts, batch):
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(dim=1) - 1
            pooled = states[torch.arange(len(idx)), last]
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def score_workload(queries: int, documents: int, seed: int = 0) -> list[list[int]]:
    """``queries`` x ``documents`` pairs (query-major): instruction + query + document ids."""
    rng = random.Random(seed)
    ids = range(1000, 40_000)

    def text(low: int, high: int) -> list[int]:
        return [rng.choice(ids) for _ in range(rng.randint(low, high))]

    instruction = text(INSTRUCTION, INSTRUCTION)
    out = []
    for _ in range(queries):
        query = instruction + text(20, 40)
        out += [query + text(LOW, HIGH) for _ in range(documents)]
    return out


def hf_score(model: torch.nn.Module, prompts: list[list[int]], batch: int) -> np.ndarray:
    """Sorted by length, right-padded per batch (pad id 0), sigmoid of the one-label logit."""
    out = np.zeros(len(prompts), np.float32)
    with torch.inference_mode():
        for idx, ids, mask in padded_batches(prompts, batch):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            out[idx] = torch.sigmoid(logits).numpy()
    return out


def classifier_checkpoint(source: Path, folder: Path) -> Path:
    """The default model's decoder saved as a one-label sequence classifier (pad id 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=1, pad_token_id=0, dtype=torch.float32
    )
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(folder))
    return folder


def row(run: str, batch: object, seconds: float, tokens: int, engine_s: float) -> dict[str, str]:
    """A table row; ``ratio``: the engine's tokens per second over this run's."""
    return {
        "run": run,
        "batch": str(batch),
        "s": f"{seconds:.1f}",
        "tok/s": f"{tokens / seconds:.0f}",
        "ratio": f"{seconds / engine_s:.2f}",
    }


def score_main(args: argparse.Namespace) -> None:
    """The scoring case (see the module docstring)."""
    from transformers import AutoModelForSequenceClassification

    folder = tempfile.TemporaryDirectory()  # the checkpoint, for the run's length
    path = classifier_checkpoint(resolve_model(None).path, Path(folder.name))
    memory = parse_memory(args.kv_cache_memory)
    engine = LLMEngine(EngineConfig(model=str(path), kv_cache_memory=memory))
    hf = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    prompts = score_workload(args.queries, args.documents)
    tokens = sum(map(len, prompts))
    params = SamplingParams(max_tokens=1, embedding=EmbeddingParams(), score=ScoreParams())

    def scores(batch: list[list[int]]) -> np.ndarray:
        outs = engine.generate([Request(i, p, params) for i, p in enumerate(batch)])
        return np.array([o.score for o in sorted(outs, key=lambda o: o.index)], np.float32)

    scores(prompts[:4])  # warm-up (kernel loads)
    got, engine_s = timed(lambda: scores(prompts))
    saved = engine.stats.prefill_tokens_saved
    rows = [row("prefixbatch", "-", engine_s, tokens, engine_s)]
    best = None
    for batch in (int(b) for b in args.hf_batches.split(",")):
        expected, hf_s = timed(lambda: hf_score(hf.eval(), prompts, batch))  # noqa: B023
        best = hf_s if best is None else min(best, hf_s)
        rows.append(row("transformers", batch, hf_s, tokens, engine_s))
    assert best is not None
    error = float(np.abs(got - expected).max())
    pairs = f"{args.queries} queries x {args.documents} documents"
    print(f"{pairs}, {tokens} prompt tokens, {saved} prefill tokens saved by sharing; "
          f"max abs difference from transformers: {error:.2e}")  # fmt: skip
    print(table(rows))
    print(f"prefixbatch / best transformers: {best / engine_s:.2f}x tokens per second")
    folder.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--hf-batches", default="8,32,64", help="transformers batch sizes")
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--score", action="store_true", help="the scoring case instead")
    parser.add_argument("--queries", type=int, default=200, help="scoring: queries")
    parser.add_argument("--documents", type=int, default=50, help="scoring: documents a query")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.score:
        return score_main(args)
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
