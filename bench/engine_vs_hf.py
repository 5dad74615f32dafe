"""prefixbatch against Hugging Face transformers' batched generate on the CPU: the same chat
requests on the same default model (SmolLM2-135M-Instruct, fp32), greedy. Workloads:

- ``job``: a batch job's mix, shuffled: one-word labels (max_tokens 8), short answers (48) and
  paragraphs (192); answers end at EOS or max_tokens.
- ``eos``: paragraphs only, answers end at EOS (up to --max-tokens).
- ``fixed``: EOS ignored, every answer exactly --max-tokens long: equal work per step on both.

transformers' best batched path here: requests sorted by max_tokens, then prompt length (least
padding), in left-padded batches (sizes from --hf-batches, best reported); a batch lasts until its
longest answer ends. Throughput counts answer tokens (up to and including EOS).

The dense-matmul floor is the engine's own projections alone on the engine's own forward steps
(``matmul_floor``). The engine and its floor run ``--repeats`` times, alternately, and the
medians are reported, so that the machine's drift falls on both.

    python bench/engine_vs_hf.py [--requests 64] [--max-tokens 128] [--workloads job,eos,fixed]
                                 [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import machine, table, timed

from prefixbatch import LLM, SamplingParams

TOPICS = [
    "the ocean",
    "volcanoes",
    "bread",
    "chess",
    "the moon",
    "trains",
    "bees",
    "glass",
    "rivers",
    "clocks",
    "maps",
    "salt",
    "owls",
    "bridges",
    "tea",
    "snow",
]


REVIEWS = [
    "The battery died after a week.",
    "Absolutely loved the soundtrack!",
    "Shipping was slow but the product works.",
    "Worst customer service ever.",
    "A solid, reliable kettle.",
    "The colours faded after one wash.",
]
QUESTIONS = [
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "What gas do plants absorb?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean?",
    "What is the freezing point of water?",
]


def job(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], int]]:
    """(chat, max_tokens) for a mixed batch job, shuffled."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            text = (
                f"Classify the sentiment of this review as positive or negative. "
                f"Answer with one word.\nReview: {rng.choice(REVIEWS)}"
            )
            items.append(([{"role": "user", "content": text}], 8))
        elif kind == 1:
            items.append(([{"role": "user", "content": rng.choice(QUESTIONS)}], 48))
        else:
            items.append((chats(1, seed * 1000 + i)[0], 192))
    rng.shuffle(items)
    return items


def chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [
            {
                "role": "user",
                "content": f"Write {rng.choice(['a short', 'a long', 'an'])} "
                f"paragraph about {rng.choice(TOPICS)} for a {rng.choice(['child', 'student'])}.",
            }
        ]
        for _ in range(n)
    ]


def answer_tokens(ids: list[int], eos: set[int]) -> int:
    """Tokens of one answer up to and including its first EOS."""
    return next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))


def hf_generate(
    model,
    requests: list[tuple[list[int], int]],
    batch: int,  # type: ignore[no-untyped-def]
    eos: list[int],
    ignore_eos: bool,
) -> int:
    """Left-padded batched greedy generate over (prompt, max_tokens) sorted by max_tokens and
    length, ``batch`` at a time; returns the answer tokens kept (each cut at its max_tokens)."""
    made = 0
    ordered = sorted(requests, key=lambda r: (r[1], len(r[0])))
    for i in range(0, len(ordered), batch):
        chunk = ordered[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        longest = max(m for _, m in chunk)
        ids = torch.tensor([[eos[0]] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest if ignore_eos else 0,
                do_sample=False,
                pad_token_id=eos[0],
                eos_token_id=None if ignore_eos else eos,
            )
        stop = set() if ignore_eos else set(eos)
        made += sum(
            answer_tokens(row[:m], stop) for row, (_, m) in zip(out[:, width:].tolist(), chunk)
        )
    return made


def matmul_floor(model: torch.nn.Module, steps: list[tuple[int, int]], reps: int = 3) -> float:
    """Seconds the engine's own projections (its GEMM path, its weights) alone take for these
    forward steps ((tokens, sampled rows) each): the engine minus everything but the GEMMs. Each
    distinct step shape is timed ``reps`` times, the median kept (one timing weighted by the
    hundred decode steps of one shape moved the floor by up to 15%)."""

    def linears(layer: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
        return (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        )

    def seconds(m: int, rows: int) -> float:
        inputs = [torch.randn(m, lin.in_features) for lin in linears(model.layers[0])]
        head_in = torch.randn(rows, model.lm_head.in_features)
        start = time.perf_counter()
        for layer in model.layers:
            for x, lin in zip(inputs, linears(layer)):
                lin(x)
        model.lm_head(head_in)
        return time.perf_counter() - start

    with torch.inference_mode():
        cost = {s: statistics.median(seconds(*s) for _ in range(reps)) for s in set(steps)}
    return sum(cost[s] for s in steps)


def workload(name: str, n: int, max_tokens: int) -> list[tuple[list[dict[str, str]], int]]:
    if name == "job":
        return job(n)
    return [(c, max_tokens) for c in chats(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batches", default="16,64", help="batch sizes tried for transformers")
    parser.add_argument("--workloads", default="job,eos,fixed")
    parser.add_argument(
        "--repeats", type=int, default=3, help="engine runs, each followed by a floor run"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    llm = LLM(kv_cache_memory="1GiB")
    eos = list(llm.engine.eos_ids)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(llm.engine.loaded.source.path), dtype=torch.float32
    )
    hf.eval()
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    steps: list[tuple[int, int]] = []  # (tokens, sampled rows) of every forward step
    forward = llm.engine.runner.model  # the forward every step runs (the CPU fast path's)

    def counted(*args):  # type: ignore[no-untyped-def]
        steps.append((len(args[0]), len(args[4])))  # ids, ..., logits_rows
        return forward(*args)

    llm.engine.runner.model = counted
    rows = []
    for name in args.workloads.split(","):
        fixed = name == "fixed"
        items = workload(name, args.requests, args.max_tokens)
        requests = [(llm.tokenizer.encode_chat(c), m) for c, m in items]
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=fixed) for _, m in items]
        # The engine and its floor alternate, medians kept: the machine's speed drifts by 5-10%
        # over minutes, which moved a single engine run / floor run pair by 4 points.
        engine_runs, floor_runs = [], []
        for _ in range(args.repeats):
            steps.clear()
            outs, secs = timed(lambda r=requests, p=params: llm.generate([x for x, _ in r], p))
            engine_runs.append(secs)
            floor_runs.append(matmul_floor(llm.engine.worker.model, steps))
        ours, floor = statistics.median(engine_runs), statistics.median(floor_runs)
        tokens = sum(len(o.output_token_ids) for o in outs)
        print(
            f"[{name}] prefixbatch s: {' '.join(f'{t:.1f}' for t in engine_runs)}; "
            f"floor s: {' '.join(f'{t:.1f}' for t in floor_runs)}",
            flush=True,
        )
        rows.append(
            {
                "workload": name,
                "engine": "dense-matmul floor",
                "batch": "same steps",
                "answer tokens": tokens,
                "seconds": f"{floor:.1f}",
                "tok/s": f"{tokens / floor:.1f}",
            }
        )
        rows.append(
            {
                "workload": name,
                "engine": "prefixbatch",
                "batch": "KV-bounded",
                "answer tokens": tokens,
                "seconds": f"{ours:.1f}",
                "tok/s": f"{tokens / ours:.1f}",
            }
        )
        best = 0.0
        for batch in map(int, args.hf_batches.split(",")):
            made, secs = timed(lambda b=batch, r=requests, f=fixed: hf_generate(hf, r, b, eos, f))
            best = max(best, made / secs)
            rows.append(
                {
                    "workload": name,
                    "engine": "transformers generate",
                    "batch": str(batch),
                    "answer tokens": made,
                    "seconds": f"{secs:.1f}",
                    "tok/s": f"{made / secs:.1f}",
                }
            )
        print(
            f"[{name}] prefixbatch / best transformers: {tokens / ours / best:.2f}x; "
            f"prefixbatch at {floor / ours:.0%} of the dense-matmul floor",
            flush=True,
        )
    print(f"{args.requests} chat requests per workload, greedy")
    print(table(rows))


if __name__ == "__main__":
    main()
