"""Read how a checkpoint pools its embeddings (``pooling.PoolingConfig``) from its files.

Where sentence-transformers' files are present (``modules.json`` listing a ``Pooling`` module
and its ``config.json``, and optionally a ``Normalize`` module), they decide, as
sentence-transformers runs them: ``pooling_mode_lasttoken`` -> last-token pooling,
``pooling_mode_mean_tokens`` -> mean pooling; normalised when ``Normalize`` is listed. Any other
mode (CLS, max, weighted mean, several at once) raises ``UnsupportedModelError`` naming it: on a
causal decoder the first token's state sees nothing of the text. Without those files the model
pools the last token and normalises (vLLM's default for decoder embedding models).

Matryoshka support (``dimensions``) is declared in config.json as vLLM reads it:
``matryoshka_dimensions`` (the sizes it was trained at) or ``is_matryoshka: true`` (any size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError
from ..pooling import PoolingConfig

_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"cannot read {path}: {e}") from e


def read_pooling_config(path: Path) -> PoolingConfig:
    """The pooling of the checkpoint in the folder ``path``; raises ``UnsupportedModelError``
    for a pooling mode the engine does not run or unreadable sentence-transformers files."""
    config = path / "config.json"
    hf = _json(config) if config.is_file() else {}
    sizes = tuple(int(d) for d in hf.get("matryoshka_dimensions") or ())
    matryoshka = bool(hf.get("is_matryoshka", False))
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig("last", True, matryoshka, sizes)
    modules = _json(modules_file)
    types = [m.get("type") for m in modules]
    normalize = _NORMALIZE in types
    if _POOLING not in types:
        return PoolingConfig("last", normalize, matryoshka, sizes)
    folder = modules[types.index(_POOLING)].get("path", "")
    pooling = _json(path / folder / "config.json")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if len(modes) != 1 or modes[0] not in _MODES:
        raise UnsupportedModelError(
            f"sentence-transformers pooling {modes or 'none'} in {path / folder}: only "
            "'pooling_mode_lasttoken' or 'pooling_mode_mean_tokens' runs on a causal decoder"
        )
    if pooling.get("include_prompt", True) is False:
        raise UnsupportedModelError(f"pooling with 'include_prompt': false in {path / folder}")
    return PoolingConfig(_MODES[modes[0]], normalize, matryoshka, sizes)  # type: ignore[arg-type]
