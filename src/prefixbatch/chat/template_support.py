"""What a chat template can render, read from its source once.

transformers passes ``tools`` to a template as a variable and each message as a dict; a template
that never reads ``tools`` (or a message's ``tool_calls``) renders the conversation without them,
silently, and the model answers as if it had no tools or had never called one. The names a
template's code reads are found with jinja2's lexer (the expressions inside ``{{ }}`` and
``{% %}``, not the literal text around them), which needs no knowledge of the custom tags some
templates use (transformers' ``{% generation %}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class TemplateSupport:
    """``tools``: the template reads the ``tools`` variable; ``tool_calls``: it reads a
    message's ``tool_calls`` (an assistant turn's calls in a history)."""

    tools: bool
    tool_calls: bool

    @staticmethod
    @lru_cache(maxsize=16)
    def of(template: str) -> TemplateSupport:
        """The support of a template's source. A template jinja2 cannot lex is taken to read
        everything: rendering it reports the syntax error itself."""
        import jinja2

        try:
            read = {
                value.strip("'\"")  # a string token keeps its quotes
                for _, kind, value in jinja2.Environment().lex(template)
                if kind in ("name", "string")
            }
        except jinja2.TemplateSyntaxError:
            return TemplateSupport(True, True)
        return TemplateSupport("tools" in read, "tool_calls" in read)
