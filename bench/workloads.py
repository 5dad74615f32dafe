"""Synthetic shared-prefix batch jobs (token ids, shuffled) that users actually run."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def fewshot(scale: float = 1.0, seed: int = 0) -> Workload:
    """Evaluation suite: one few-shot prefix per subject (12 subjects, 500 tokens), many short
    questions per subject, one-word answers."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, 500) for _ in range(12)]
    n = int(6 * scale)
    prompts = [p + _tokens(rng, rng.randrange(20, 40)) for p in prefixes for _ in range(n)]
    rng.shuffle(prompts)
    return Workload("few-shot eval", prompts, 8)


def docqa(scale: float = 1.0, seed: int = 1) -> Workload:
    """RAG: many documents (500 tokens), four questions each."""
    rng = random.Random(seed)
    docs = [_tokens(rng, 500) for _ in range(int(16 * scale))]
    prompts = [d + _tokens(rng, rng.randrange(10, 30)) for d in docs for _ in range(4)]
    rng.shuffle(prompts)
    return Workload("document QA", prompts, 32)


def multilevel(scale: float = 1.0, seed: int = 2) -> Workload:
    """System prompt (300 tokens) > document (400) > question."""
    rng = random.Random(seed)
    system = _tokens(rng, 300)
    docs = [_tokens(rng, 400) for _ in range(int(8 * scale))]
    prompts = [system + d + _tokens(rng, rng.randrange(10, 30)) for d in docs for _ in range(6)]
    rng.shuffle(prompts)
    return Workload("multi-level", prompts, 32)


def noshare(scale: float = 1.0, seed: int = 3) -> Workload:
    """Nothing shared at all."""
    rng = random.Random(seed)
    prompts = [_tokens(rng, rng.randrange(150, 350)) for _ in range(int(64 * scale))]
    return Workload("no sharing", prompts, 32)


ALL = {"fewshot": fewshot, "docqa": docqa, "multilevel": multilevel, "noshare": noshare}
