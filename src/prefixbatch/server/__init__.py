"""The OpenAI Files + Batches API over the engine (``prefixbatch serve``).

Its packages are optional: without fastapi, uvicorn or python-multipart, importing this package
raises ``MissingDependencyError`` (a ``JobError``) naming the one that is missing.
"""

from ..optional import require

for _module in ("fastapi", "uvicorn", "python_multipart"):
    require(_module, "prefixbatch serve")

from .main import ServeOptions, serve  # noqa: E402  (after the check that names the package)

__all__ = ["ServeOptions", "serve"]
