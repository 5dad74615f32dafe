"""Reasoning content: the thought a reasoning model writes between ``<think>`` and ``</think>``
before its answer goes to ``message.reasoning_content`` (vLLM's field), the rest to ``content``.

Whether the answer starts inside a thought is read from the rendered prompt, not guessed per
model: templates that force thinking end the prompt with ``<think>`` (DeepSeek-R1 distills,
Qwen3 thinking models), so the answer only closes it; Qwen3's hybrid template leaves the opening
to the model, or writes an empty ``<think>\\n\\n</think>`` when ``enable_thinking`` is false.
vLLM's ``deepseek_r1`` and ``qwen3`` reasoning parsers differ exactly in that assumption; here
both names are the one ``<think>`` parser. A thought cut off by ``max_tokens`` is all
reasoning (``content`` null); a thought counts toward ``max_tokens`` like any output token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..execution.tool_grammar import ThoughtSyntax


@dataclass(frozen=True)
class ReasoningParser:
    """Splits an answer at its ``start`` ... ``end`` thought."""

    name: str
    start: str = "<think>"
    end: str = "</think>"

    def opens(self, prompt: str) -> bool:
        """Whether ``prompt`` leaves a thought open: its last ``start`` after its last ``end``."""
        return prompt.rfind(self.start) > prompt.rfind(self.end)

    def split(self, text: str, opened: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of an answer; ``opened``: the prompt opened the thought.
        Without a thought the content is ``text`` unchanged; an empty part is None."""
        if not opened:
            stripped = text.lstrip()
            if not stripped.startswith(self.start):
                return None, text
            text = stripped[len(self.start) :]
        reasoning, closed, content = text.partition(self.end)
        return reasoning.strip() or None, (content.lstrip() or None) if closed else None

    def syntax(self, opened: bool) -> ThoughtSyntax:
        """The thought's syntax for a grammar that lets a forced answer think first."""
        return ThoughtSyntax(self.start, self.end, opened)


THINK = ReasoningParser("think")
REASONING_PARSERS: dict[str, ReasoningParser] = {
    "think": THINK,
    "deepseek_r1": THINK,  # vLLM's names
    "qwen3": THINK,
}


def detect_reasoning_parser(template: str) -> ReasoningParser | None:
    """The ``<think>`` parser when the chat template writes or strips thoughts, else None."""
    return THINK if THINK.start in template or THINK.end in template else None
