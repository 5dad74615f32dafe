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

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions with a prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
