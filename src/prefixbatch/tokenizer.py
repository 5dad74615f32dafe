"""Tokenizer and chat template, through transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .loading.score_config import read_score_config
from .optional import require

# OpenAI's newer name for the system message; templates only know "system".
ROLE_ALIASES = {"developer": "system"}
# What needs xgrammar here (``token_bytes``); batch files refuse such lines when it is missing.
TOKEN_BYTES_FEATURE = "log-probabilities in batch output (each token's exact bytes)"


def message_text(content: Any) -> str:
    """A message's content as one string: a string, or a list of text parts joined with "\\n"
    as vLLM joins them (vllm/entrypoints/chat_utils.py). Raises ValueError otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "\n".join(p["text"] for p in content)
    if isinstance(content, list):
        raise ValueError("only text content parts are supported")
    raise ValueError("content must be a string or a list of text parts")


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: ``developer`` -> ``system``, content a string
    (an assistant turn's null content, beside its ``tool_calls``, is ``""``)."""
    return [
        {
            **m,
            "role": ROLE_ALIASES.get(m["role"], m["role"]),
            "content": "" if m.get("content") is None else message_text(m["content"]),
        }
        for m in messages
    ]


class Tokenizer:
    """Encodes prompts and chats, decodes outputs; the template adds special tokens itself."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.path = path
        self._token_bytes: list[bytes] | None = None

    def token_bytes(self, vocab_size: int) -> list[bytes]:
        """Each token id's exact bytes, ``vocab_size`` of them (ids the tokenizer does not
        know: empty), for log-probability records. Byte-level and sentencepiece vocabularies
        are decoded by xgrammar's tokenizer analysis; built once, on first use. Raises
        ``MissingDependencyError`` without xgrammar (batch files refuse such lines first)."""
        if self._token_bytes is None:
            xgr = require("xgrammar", TOKEN_BYTES_FEATURE)
            info = xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=vocab_size)
            self._token_bytes = list(info.decoded_vocab)
        vocab = self._token_bytes
        return vocab + [b""] * (vocab_size - len(vocab))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The chat template's text for a conversation. By default it ends with the start of a
        new assistant turn; ``continue_final_message`` (with ``add_generation_prompt=False``)
        leaves the final assistant message open so the answer continues it (vLLM's chat
        extensions, passed to transformers' ``apply_chat_template``). ``tools`` (OpenAI's
        function tools), ``chat_template`` (a template's text, instead of the model's) and
        ``template_kwargs`` (extra template variables, e.g. ``enable_thinking``) go to
        ``apply_chat_template`` as they are. Raises ValueError for a model without a template
        or both options set."""
        if not (chat_template or self.hf.chat_template):
            raise ValueError("this model has no chat template; use /v1/completions with a prompt")
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "continue_final_message needs add_generation_prompt: false "
                "(the answer continues the last message instead of starting a new one)"
            )
        messages = normalise_messages(messages)
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a rendered chat (it already holds the special tokens it needs)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, Any]], **template_options: bool) -> list[int]:
        """Token ids of ``render_chat(messages, **template_options)``."""
        return self.encode_text(self.render_chat(messages, **template_options))

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids of score pairs (text_1, text_2), as vLLM tokenizes them for a scoring
        model: ``tokenizer(text_1, text_pair=text_2)``, special tokens as the tokenizer adds
        them to a pair, or the one text ``text_1 + text_2`` when the model's config.json sets
        ``use_sep_token: false`` (``loading/score_config.py``). Raises
        ``UnsupportedModelError`` for a config.json that cannot be read."""
        if not pairs:
            return []
        if not read_score_config(self.path).pair_tokens:
            return self.encode_batch([a + b for a, b in pairs], add_special_tokens=True)
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        return [list(ids) for ids in self.hf(firsts, seconds)["input_ids"]]

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Many texts in one call (the Rust tokenizer runs them in parallel)."""
        return [
            list(ids) for ids in self.hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
        ]
