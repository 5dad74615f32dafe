"""Where the package's log messages go: loading, GGUF conversion, kernel builds, checks.

The CLI always sends them to stderr (``--quiet``: warnings only). The Python API does the same
unless the application has set up logging itself (a handler on the root logger or on
``prefixbatch``), as vLLM configures its own logger by default: a first ``LLM()`` can spend
minutes converting a checkpoint and compiling kernels, and should say so.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "prefixbatch"


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send the package's messages at ``level`` and above to stderr as ``[prefixbatch] ...``
    lines, replacing any handler it had."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[prefixbatch] %(message)s"))
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def log_to_stderr_unless_configured() -> None:
    """``log_to_stderr()`` when neither the root logger nor the package's has a handler."""
    if not logging.getLogger().handlers and not logging.getLogger(LOGGER).handlers:
        log_to_stderr()
