"""Structured output: grammars compiled per request, token masks filled per step, through
xgrammar (https://github.com/mlc-ai/xgrammar).

Why xgrammar: it is vLLM's and SGLang's default engine, maintained by the MLC team, and runs
entirely on the CPU (grammar compilation, the matcher and the bitmask fill are C++; masks are
applied to CPU logits by its own CPU kernel and to CUDA logits by a Triton/CUDA one). It splits
the vocabulary at compile time into tokens whose validity does not depend on the parser stack
(precomputed once per grammar) and the few that do, so filling a mask costs tens of microseconds
per row for a JSON schema on a 49k vocabulary; ``BatchGrammarMatcher`` fills a whole step's rows
in its own threads, outside the GIL, while the forward pass runs. Compiled grammars are cached by
their text, so 1,000 requests with one schema compile it once.

Supported (OpenAI ``response_format`` and vLLM's guided extensions):
``{"type": "json_object"}`` (any JSON object, not any JSON value),
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, ``guided_regex``
and ``guided_choice`` (one of a list of strings); and the tool calls that ``tool_choice``
``"required"`` or a named function asks for (an xgrammar structural tag, ``tool_grammar.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import torch

from ..grammar_spec import GRAMMAR_FEATURE, GrammarSpec
from ..optional import require

# Optional: a machine without xgrammar runs everything but structured requests, which are
# refused line by line before any compute (``GrammarSpec.check``).
xgr = require("xgrammar", GRAMMAR_FEATURE)


def _choice_grammar(choices: list[str]) -> str:
    # EBNF string literals take JSON-style escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _bitmask_of(tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
    """(ceil(vocab / 32),) int32 words with the bits of ``tokens`` set (xgrammar's layout)."""
    words = (vocab_size + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[list(tokens)] = 1
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)  # (words,) in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class StructuredOutput:
    """Grammars for one tokenizer and model vocabulary; masks and advances a step's rows.

    ``hf_tokenizer`` is the transformers tokenizer, ``vocab_size`` the model's logits width
    (may exceed the tokenizer's: padding tokens are never allowed), ``stop_token_ids`` the
    tokens that end a request (the only ones allowed once a grammar is complete).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        threads: int = 2,
    ) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=threads)
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self.compile = lru_cache(maxsize=256)(self._compile)
        self._non_stop_bits = _bitmask_of(
            [t for t in range(vocab_size) if t not in set(stop_token_ids)], vocab_size
        )

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """Raises ValueError for a schema, regex or choice list xgrammar cannot compile."""
        try:
            if spec.kind in ("json_object", "json_schema"):
                # json_object is any JSON object (OpenAI), not any JSON value. Whitespace is
                # fixed (", " and ": "): free whitespace lets small models loop on newlines.
                schema = spec.source or '{"type": "object"}'
                return self._compiler.compile_json_schema(schema, any_whitespace=False)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.source)
            if spec.kind == "structural_tag":
                return self._compiler.compile_structural_tag(spec.source)
            return self._compiler.compile_grammar(_choice_grammar(json.loads(spec.source)))
        except (RuntimeError, ValueError) as e:  # xgrammar reports bad input as either
            raise ValueError(f"cannot compile {spec.kind}: {e}") from e

    def matcher(self, spec: GrammarSpec) -> xgr.GrammarMatcher:
        """A fresh matcher at the start of the grammar (one per request choice)."""
        return xgr.GrammarMatcher(self.compile(spec))

    def token_bytes(self) -> list[bytes]:
        """Each token id's exact bytes (byte-level and sentencepiece vocabularies decoded)."""
        return list(self.info.decoded_vocab)

    def allocate(self, batch: int) -> torch.Tensor:
        """An all-allowed bitmask for ``batch`` rows: (batch, ceil(vocab / 32)) int32 on the
        CPU, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed."""
        return xgr.allocate_token_bitmask(batch, self.vocab_size)

    def fill(
        self, matchers: Sequence[xgr.GrammarMatcher], rows: Sequence[int], bitmask: torch.Tensor
    ) -> torch.Tensor:
        """Write the allowed-token mask of each matcher's next token into ``bitmask`` (from
        ``allocate``) row ``rows[i]`` for ``matchers[i]``; other rows are left as they are.
        Raises RuntimeError for a matcher that has already accepted its stop token."""
        self._batch.batch_fill_next_token_bitmask(list(matchers), bitmask, indices=list(rows))
        return bitmask

    def fill_async(
        self, matchers: Sequence[xgr.GrammarMatcher], rows: Sequence[int], batch: int
    ) -> Future[torch.Tensor]:
        """``fill`` into a fresh bitmask of ``batch`` rows on a worker thread, to overlap with
        the forward pass."""
        return self._filler.submit(self.fill, list(matchers), list(rows), self.allocate(batch))

    def only_stop_allowed(self, bitmask: torch.Tensor, rows: Sequence[int]) -> list[bool]:
        """For each of ``rows`` of a filled ``bitmask``: whether its grammar allows nothing but
        a stop token (the grammar is complete and cannot continue)."""
        others = bitmask[list(rows)] & self._non_stop_bits  # (R, words)
        return (others == 0).all(dim=1).tolist()

    def apply(self, logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
        """Set the tokens ``bitmask`` (from ``fill``) disallows to -inf in ``logits``
        (batch, vocab) rows ``rows``, in place; other rows are not touched."""
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), indices=list(rows)
        )

    def accept(self, matchers: Sequence[xgr.GrammarMatcher], tokens: Sequence[int]) -> list[bool]:
        """Advance each matcher by its sampled token; False where the grammar rejects it."""
        return list(self._batch.batch_accept_token(list(matchers), list(tokens)))
