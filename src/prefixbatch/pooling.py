"""Embeddings: what a request asks for (``EmbeddingParams``) and how a model pools its hidden
states into one vector (``PoolingConfig``, read from the checkpoint by
``loading/pooling_config.py``).

Pooling, as sentence-transformers' ``Pooling`` and ``Normalize`` modules compute it on the
final-norm hidden states (transformers' ``last_hidden_state``): ``last`` takes the last prompt
token's state (``pooling_mode_lasttoken``: Qwen3-Embedding, E5-Mistral), ``mean`` averages
every prompt token's state (``pooling_mode_mean_tokens``); ``normalize`` divides by the L2
norm. ``dimensions`` (OpenAI's field) keeps the first ``dimensions`` values and normalises
again (Matryoshka representation learning, Kusupati et al. 2022): only for a model that
declares it was trained so (``matryoshka``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

POOLING_METHODS = ("last", "mean")
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingParams:
    """One embedding request's options: ``dimensions`` (None: the model's full size) and
    OpenAI's ``encoding_format`` (``float``: a JSON list; ``base64``: the little-endian
    float32 bytes in base64), which only the output format reads."""

    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"


@dataclass(frozen=True)
class PoolingConfig:
    """How a model turns hidden states into an embedding: ``method`` (``last`` or ``mean``),
    ``normalize`` (L2), and Matryoshka support: ``matryoshka`` (any ``dimensions`` from 1 to
    the hidden size) or ``matryoshka_dimensions`` (only these sizes; implies support)."""

    method: Literal["last", "mean"] = "last"
    normalize: bool = True
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()

    @property
    def every_row(self) -> bool:
        """Whether pooling reads every prompt token's hidden state (``mean``)."""
        return self.method == "mean"

    def check(self, params: EmbeddingParams, hidden_size: int) -> str | None:
        """Why ``params`` cannot run on this model (naming the field), or None."""
        d = params.dimensions
        if d is None:
            return None
        if not (self.matryoshka or self.matryoshka_dimensions):
            return (
                "'dimensions' is not supported by this model: it declares no Matryoshka "
                "training (config.json 'matryoshka_dimensions' or 'is_matryoshka')"
            )
        if self.matryoshka_dimensions and d not in self.matryoshka_dimensions:
            sizes = ", ".join(map(str, self.matryoshka_dimensions))
            return f"'dimensions' must be one of {sizes} for this model, got {d}"
        if not 1 <= d <= hidden_size:
            return f"'dimensions' must be in 1..{hidden_size}, got {d}"
        return None

    def finish(self, pooled: np.ndarray, params: EmbeddingParams) -> np.ndarray:
        """A pooled vector (hidden,) fp32 -> the embedding: normalised, then cut to
        ``params.dimensions`` and normalised again (when the model normalises)."""
        v = self._normed(pooled.astype(np.float32, copy=False))
        if params.dimensions is not None:
            v = self._normed(v[: params.dimensions])
        return v

    def _normed(self, v: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return v
        norm = float(np.linalg.norm(v))
        return v / max(norm, 1e-12)  # torch.nn.functional.normalize's eps
