"""The OpenAI Files + Batches API over the engine (``prefixbatch serve``)."""

from .main import ServeOptions, serve

__all__ = ["ServeOptions", "serve"]
