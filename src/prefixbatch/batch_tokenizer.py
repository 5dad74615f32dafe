"""Tokenize a whole batch at the tokenizer's speed, each repeated piece of text once.

A fast (Rust) tokenizer first cuts its input at its added tokens (BOS, the chat template's role
markers, ...) and then normalizes, pre-tokenizes and encodes each piece between them on its own
(``tokenizers``' ``AddedVocabulary``). So the ids of a rendered chat are the ids of its pieces in
order, with each added token's id between them, and a piece that repeats (a system prompt sent
10,000 times, the role headers) needs encoding once. The distinct new pieces of a chunk of
texts are encoded in one batch call (the Rust side uses every core).

One step of a piece's processing can depend on where it sits: a Metaspace pre-tokenizer with
``prepend_scheme="first"`` (Llama 2, Mistral) prefixes "▁" only to the piece at the very start
of the input. So a piece that does not start its text is encoded after an added token, whose id
is then dropped: in the same position as inside the text.

Where that reasoning does not hold, every text is encoded whole (the plain path): slow (Python)
tokenizers, added tokens that take in their neighbours (``lstrip``, ``rstrip``,
``single_word``), ``split_special_tokens``. The first texts are also encoded both ways; a
difference switches to the plain path for good. Tested token for token against the plain path
for every chat template the project supports (``tests/test_batch_tokenizer.py``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any

import numpy as np

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

_FIRST, _INNER, _PROMPT = 0, 1, 2  # a piece at a text's start, a later piece, a whole prompt


class BatchTokenizer:
    """Token ids of many texts at once, through ``tokenizer`` (see the module docstring).

    ``cache_size``: distinct pieces remembered across calls (least recently used dropped);
    ``check``: how many texts are compared with the plain path before it is trusted."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 1 << 16, check: int = 64) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._unchecked = check
        self._backend: Any = getattr(tokenizer.hf, "backend_tokenizer", None)
        self._split: re.Pattern[str] | None = None
        self._added: dict[str, int] = {}
        if self._backend is not None and tokenizer.hf.is_fast:
            if self._backend.truncation is not None:  # what transformers' own call does
                self._backend.no_truncation()
            if self._backend.padding is not None:
                self._backend.no_padding()
            self._split, self._added = _splitter(self._backend)

    @property
    def pieces(self) -> bool:
        """Whether chats are encoded piece by piece (False: the plain path)."""
        return self._split is not None

    def encode_chats(self, texts: list[str]) -> list[np.ndarray]:
        """Int32 ids of rendered chat texts, which hold their own special tokens (as
        ``Tokenizer.encode_batch(texts, add_special_tokens=False)``)."""
        if self._split is None:
            return self._plain(texts, special=False)
        split = self._split.split
        layouts = [split(t) for t in texts]  # [piece, added token, piece, ..., piece]
        wanted = {
            (part, _FIRST if j == 0 else _INNER)
            for parts in layouts
            for j, part in enumerate(parts[::2])
            if part
        }
        found = self._lookup(wanted)
        out = []
        for parts in layouts:
            arrays = []
            for j, part in enumerate(parts):
                if j % 2:
                    arrays.append(np.array([self._added[part]], dtype=np.int32))
                elif part:
                    arrays.append(found[(part, _FIRST if j == 0 else _INNER)])
            out.append(np.concatenate(arrays) if arrays else np.zeros(0, np.int32))
        if not self._agrees(texts, out, special=False):
            log.info("this tokenizer's pieces differ from whole texts: encoding whole texts")
            self._split = None
            return self._plain(texts, special=False)
        return out

    def encode_prompts(self, texts: list[str]) -> list[np.ndarray]:
        """Int32 ids of completion prompts with the tokenizer's special tokens (BOS) added;
        equal prompts are encoded once."""
        if self._backend is None:
            return self._plain(texts, special=True)
        found = self._lookup({(t, _PROMPT) for t in texts})
        out = [found[(t, _PROMPT)] for t in texts]
        if not self._agrees(texts, out, special=True):
            log.info("this tokenizer's batch calls differ from transformers': encoding through it")
            self._backend = self._split = None
            return self._plain(texts, special=True)
        return out

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[np.ndarray]:
        """Int32 ids of score pairs (``Tokenizer.encode_pairs``), in one batch call."""
        return [_array(ids) for ids in self.tokenizer.encode_pairs(pairs)]

    def _lookup(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
        """The ids of every key, encoding those not in the cache in batch calls."""
        found: dict[tuple[str, int], np.ndarray] = {}
        missing: dict[int, list[str]] = {_FIRST: [], _INNER: [], _PROMPT: []}
        for key in keys:
            ids = self._cache.get(key)
            if ids is None:
                missing[key[1]].append(key[0])
            else:
                self._cache.move_to_end(key)
                found[key] = ids
        encode = self._backend.encode_batch_fast if self._backend is not None else None
        for kind, texts in missing.items():
            if not texts:
                continue
            assert encode is not None
            if kind == _INNER:  # after an added token, as inside the text; its id is dropped
                sep = next(iter(self._added))
                encs = encode([sep + t for t in texts], add_special_tokens=False)
                ids = [_array(e.ids)[1:] for e in encs]
            else:
                encs = encode(texts, add_special_tokens=kind == _PROMPT)
                ids = [_array(e.ids) for e in encs]
            for t, i in zip(texts, ids):
                found[(t, kind)] = self._cache[(t, kind)] = i
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found

    def _agrees(self, texts: list[str], ids: list[np.ndarray], special: bool) -> bool:
        """Whether the first texts not checked yet have the plain path's ids."""
        n = min(self._unchecked, len(texts))
        self._unchecked -= n
        plain = self._plain(texts[:n], special)
        return all(np.array_equal(a, b) for a, b in zip(plain, ids[:n]))

    def _plain(self, texts: list[str], special: bool) -> list[np.ndarray]:
        if not texts:
            return []
        return [_array(ids) for ids in self.tokenizer.encode_batch(texts, special)]


def _array(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


def _splitter(backend: Any) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A regex that cuts text where the tokenizer does (at its added tokens matched on the raw
    text, leftmost-longest first, as its Aho-Corasick matcher does), and their ids; None when
    pieces could be encoded differently from inside the whole text."""
    if getattr(backend, "encode_special_tokens", False):
        return None, {}
    added = backend.get_added_tokens_decoder()
    raw = {t.content: i for i, t in added.items() if not t.normalized}
    if not raw or any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None, {}
    sep = next(iter(raw))
    if backend.encode(sep + "a", add_special_tokens=False).ids[:1] != [raw[sep]]:
        return None, {}
    alternatives = "|".join(re.escape(c) for c in sorted(raw, key=len, reverse=True))
    return re.compile(f"({alternatives})"), raw
