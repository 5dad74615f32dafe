"""Optional dependencies, imported by the feature that uses them.

The core (``import prefixbatch``, a job of requests that ask for no optional feature) needs only
torch, transformers (which brings numpy, safetensors and tokenizers) and, on CUDA, triton.
Everything else is imported where it is used (through ``require``; Ray by the executor, with
its own ``RayUnavailableError``), so a machine without it runs every other request and says
which package a feature needs:

| module | pip package | used by |
|---|---|---|
| ``xgrammar`` | xgrammar | structured output, forced tool calls; log-probability token bytes |
| ``gguf`` | gguf | reading a ``.gguf`` model |
| ``fastapi``, ``uvicorn``, ``python_multipart`` | fastapi, uvicorn, python-multipart | ``serve`` |
| ``ray`` | ray (``prefixbatch[ray]``) | ``--workers`` / ``--ray-address`` |
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from .errors import MissingDependencyError

# Modules whose pip package has another name.
_PIP_NAMES = {"python_multipart": "python-multipart"}


@cache
def missing(module: str, feature: str) -> str | None:
    """Why ``feature`` cannot run here (``module`` does not import), or None when it can.
    Cached: a batch file asks for each of its lines, the import is tried once."""
    try:
        importlib.import_module(module)
    except ImportError:
        package = _PIP_NAMES.get(module, module)
        return f"{feature} needs the {package} package (pip install {package})"
    return None


def require(module: str, feature: str) -> ModuleType:
    """``module``, imported. Raises ``MissingDependencyError`` (a ``JobError``) naming the pip
    package when it is not installed."""
    problem = missing(module, feature)
    if problem is not None:
        raise MissingDependencyError(problem)
    return importlib.import_module(module)
