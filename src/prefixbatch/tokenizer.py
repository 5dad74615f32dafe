"""Tokenizer and chat template, through transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tokenizer:
    """Encodes prompts and chats, decodes outputs; the template adds special tokens itself."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat template's text for a conversation, ending with the assistant's turn."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions with a prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The rendered template already holds the special tokens (BOS, role markers).
        return list(self.hf.encode(self.render_chat(messages), add_special_tokens=False))

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Many texts in one call (the Rust tokenizer runs them in parallel)."""
        return [
            list(ids) for ids in self.hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
        ]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
