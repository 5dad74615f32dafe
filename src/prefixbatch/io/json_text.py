"""How a value from a request is shown in an error message: as the JSON it was written in
(``true``, ``null``, ``"GET"``), not as Python prints it (``True``, ``None``, ``'GET'``)."""

from __future__ import annotations

import json
from typing import Any

MAX_CHARS = 80


def json_text(value: Any) -> str:
    """``value`` as compact JSON, cut to ``MAX_CHARS`` characters (``...`` marks the cut)."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    except (TypeError, ValueError):  # not JSON-serialisable (never from a parsed line)
        text = repr(value)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."
