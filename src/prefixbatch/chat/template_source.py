"""Where a chat template given instead of the model's comes from: a file or its text.

``--chat-template FILE`` (CLI and ``serve``) and ``chat_template=`` (``LLM.chat``) take the same
values, resolved here once (``ChatOptions`` calls it): the path of an existing file, whose text
is read as UTF-8, or a Jinja template's text, as vLLM's ``--chat-template`` takes either.
"""

from __future__ import annotations

from pathlib import Path

JINJA_MARKS = ("{{", "{%")  # a Jinja template's text holds an expression or a statement


def chat_template_text(value: str) -> str:
    """The template's text: ``value``'s file read when it names an existing file, else
    ``value`` itself when it is a Jinja template's text. Raises ValueError when the file
    cannot be read, or when ``value`` names no file and holds no ``{{`` or ``{%``."""
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # a long or multi-line text is no path
        is_file = False
    if is_file:
        try:
            return Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {value}: {e}") from e
    if any(mark in value for mark in JINJA_MARKS):
        return value
    raise ValueError(
        f"chat template {value!r} is neither an existing file nor a Jinja template's text "
        "(it holds no '{{' or '{%'): give the path of a template file or the template itself"
    )
