"""Where prefixbatch keeps what it builds once per machine: converted GGUF checkpoints and
compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$PREFIXBATCH_CACHE``, or ``~/.cache/prefixbatch``."""
    return Path(os.environ.get("PREFIXBATCH_CACHE", Path.home() / ".cache" / "prefixbatch"))
