"""Output text built token by token, and the stop rules that read it, as vLLM does both.

``IncrementalDetokenizer`` is vLLM's ``detokenize_incrementally`` (vllm/transformers_utils/
detokenizer_utils.py): it decodes a short window of tokens (``prefix_offset:read_offset`` is the
part already emitted) so that merges across token boundaries and leading spaces come out right,
and emits nothing while the window ends in an incomplete UTF-8 character (U+FFFD), so a text is
never cut inside a character whatever token the output stops on.

``OutputText`` applies vLLM's stop semantics (vllm/v1/engine/detokenizer.py,
``check_stop_strings``): a stop string ends the request and is cut from the text unless
``include_stop_str_in_output``; the text of a stop token (EOS, ``stop_token_ids``) is left out
unless ``include_stop_str_in_output``; stop strings are not checked before ``min_tokens``
tokens (``execution/penalties.py`` keeps EOS and ``stop_token_ids`` from being sampled before
then).
A stop string found on the last allowed token still makes ``finish_reason`` ``"stop"``.

Only outputs with stop strings are decoded step by step (their stop checks need the text); the
text of every other output is built when it finishes (``OutputTexts.pop``), by the same
incremental decode over its tokens, so a step's host work does not grow with its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from typing import Any

from .execution.row_faults import Faults
from .sampling_params import SamplingParams
from .scheduling.sequence import Sequence as SchedSequence

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens that give the first output
# token its context (a leading space depends on the token before it).
PROMPT_CONTEXT_TOKENS = 5


class TokenStrings(dict[int, str]):
    """A tokenizer's token strings by id, looked up once each (``convert_ids_to_tokens`` one id
    at a time: with a list, transformers' ``skip_special_tokens`` rebuilds the special-id set on
    every call, about 10 us)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        super().__init__()
        self.hf = hf_tokenizer

    def __missing__(self, token_id: int) -> str:
        self[token_id] = token = self.hf.convert_ids_to_tokens(token_id)
        return token


class IncrementalDetokenizer:
    """Decodes one token at a time; ``hf_tokenizer`` is a transformers tokenizer. Tokens in
    ``skip_ids`` are left out of the text (the tokenizer's special tokens for
    ``skip_special_tokens``, as transformers' ``convert_ids_to_tokens`` skips them).
    ``strings``: the tokenizer's token strings, shared by the detokenizers of one engine."""

    def __init__(
        self,
        hf_tokenizer: Any,
        prompt_ids: Sequence[int],
        skip_ids: Set[int],
        strings: TokenStrings | None = None,
    ) -> None:
        self.to_string = hf_tokenizer.convert_tokens_to_string
        self.skip_ids = skip_ids
        self.strings = strings if strings is not None else TokenStrings(hf_tokenizer)
        # Two more tokens than the window in case some are special and skipped.
        self.tokens: list[str] = self._tokens(prompt_ids[-PROMPT_CONTEXT_TOKENS - 2 :])
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - PROMPT_CONTEXT_TOKENS, 0)

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.strings[i] for i in ids if i not in self.skip_ids]

    def decode_next(self, token_id: int) -> str:
        """The new complete text that ``token_id`` adds ("" while a character is incomplete)."""
        if token_id not in self.skip_ids:
            self.tokens.append(self.strings[token_id])
        emitted = self.to_string(self.tokens[self.prefix_offset : self.read_offset])
        text = self.to_string(self.tokens[self.prefix_offset :])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return text[len(emitted) :]


def find_stop_string(
    text: str, new_chars: int, stop: Sequence[str], include_in_output: bool
) -> int | None:
    """Where to cut ``text`` when a stop string appears in its last ``new_chars`` characters
    (or straddles them), else None. vLLM's ``check_stop_strings``: the first string of ``stop``
    that matches wins; the cut is before it, or after it with ``include_in_output``."""
    for s in stop:
        at = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if at != -1:
            return at + len(s) if include_in_output else at
    return None


class OutputText:
    """The text of one request's output and whether a stop string ended it; ``special_ids``:
    the tokenizer's special tokens (``all_special_ids``)."""

    def __init__(
        self,
        hf_tokenizer: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        special_ids: Set[int],
        strings: TokenStrings | None = None,
    ) -> None:
        self.params = params
        skip = special_ids if params.skip_special_tokens else frozenset()
        self.detokenizer = IncrementalDetokenizer(hf_tokenizer, prompt_ids, skip, strings)
        self.text = ""
        self.num_tokens = 0

    def append(self, token_id: int, stop_token: bool) -> bool:
        """Add the newest output token; ``stop_token``: it is EOS or in ``stop_token_ids`` and
        ended the request. Returns True when a stop string ends the output here."""
        self.num_tokens += 1
        if stop_token and not self.params.include_stop_str_in_output:
            return False
        new = self.detokenizer.decode_next(token_id)
        self.text += new
        if stop_token or not new or not self.params.stop:
            return False
        if self.num_tokens <= self.params.min_tokens:
            return False
        cut = find_stop_string(
            self.text, len(new), self.params.stop, self.params.include_stop_str_in_output
        )
        if cut is None:
            return False
        self.text = self.text[:cut]
        return True


class OutputTexts:
    """The ``OutputText`` of every sequence (each choice of a request) of one engine."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.special_ids = frozenset(hf_tokenizer.all_special_ids)
        self.strings = TokenStrings(hf_tokenizer)
        self.texts: dict[SchedSequence, OutputText] = {}

    def _new(self, seq: SchedSequence) -> OutputText:
        n = seq.num_prompt  # the detokenizer reads the prompt's last few tokens only
        prompt = seq.token_slice(max(0, n - PROMPT_CONTEXT_TOKENS - 2), n)
        return OutputText(self.hf, prompt, seq.params, self.special_ids, self.strings)

    def update(
        self,
        got: list[SchedSequence],
        where: list[int],
        finish: Callable[[SchedSequence, str, int], None],
        faults: Faults[SchedSequence],
    ) -> list[SchedSequence]:
        """Call after the scheduler wrote each sequence of ``got``'s new token at its index in
        its outputs, ``where`` (and finished those that hit EOS, a stop token or a length
        limit). Only sequences with stop strings are decoded here: a stop string ends a running
        sequence through ``finish(seq, "stop", index)`` (the token's index in its tokens; those
        are returned) and turns a ``"length"`` finish on the same token into ``"stop"``. A
        sequence whose text cannot be built is recorded in ``faults`` and left as it is."""
        ended = []
        for seq, at in zip(got, where):
            if not seq.stops_on_text:
                continue  # decoded when it finishes (``pop``): nothing reads its text before
            if faults.guard("detokenizing", seq, self._append, seq, at, finish):
                ended.append(seq)
        return ended

    def _append(
        self, seq: SchedSequence, at: int, finish: Callable[[SchedSequence, str, int], None]
    ) -> bool:
        """Decode ``seq``'s output ``at``; True when a stop string ended it there."""
        text = self.texts.get(seq)
        if text is None:
            text = self.texts[seq] = self._new(seq)
        token = seq.outputs[at]
        if not text.append(token, stop_token=seq.finish_reason == "stop"):
            return False
        if seq.finish_reason is not None:
            seq.finish_reason = "stop"
            return False
        finish(seq, "stop", seq.num_prompt + at)
        return True

    def pop(self, seq: SchedSequence) -> str:
        """The finished sequence's text (empty when it sampled no token): the tokens not
        decoded yet are decoded now, the last one as a stop token when it ended the output."""
        text = self.texts.pop(seq, None)
        if text is None:
            text = self._new(seq)
        outputs = seq.outputs
        last = len(outputs) - 1
        for k in range(text.num_tokens, len(outputs)):
            text.append(outputs[k], stop_token=k == last and seq.finish_reason == "stop")
        return text.text

    def discard(self, seq: SchedSequence) -> None:
        """Forget an aborted sequence's text."""
        self.texts.pop(seq, None)
