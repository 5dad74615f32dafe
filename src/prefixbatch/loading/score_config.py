"""Read how a checkpoint scores query-document pairs (``scoring.ScoreConfig``) from its
config.json, and resolve the score tokens of a causal LM reranker.

As vLLM reads them (``vllm/model_executor/layers/pooler`` and ``ModelConfig.use_sep_token``):
the activation on the score head's logit is sigmoid unless the checkpoint's
sentence-transformers settings name another (``sentence_transformers.activation_fn`` or
``sbert_ce_default_activation_function``: only ``torch.nn.modules.linear.Identity`` and
``torch.nn.modules.activation.Sigmoid`` are taken); a pair is tokenized as a pair
(``tokenizer(text_1, text_pair=text_2)``) unless ``use_sep_token`` (formerly
``use_pad_token``) is false: then as the one text ``text_1 + text_2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import EngineConfig, ModelConfig
from ..errors import ConfigError, UnsupportedModelError
from ..scoring import ScoreConfig

_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


def read_score_config(path: Path) -> ScoreConfig:
    """The scoring of the checkpoint in the folder ``path`` (defaults without config.json);
    raises ``UnsupportedModelError`` for an activation the engine does not apply."""
    config = path / "config.json"
    hf: dict[str, Any] = {}
    if config.is_file():
        try:
            hf = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(f"cannot read {config}: {e}") from e
    name = (hf.get("sentence_transformers") or {}).get("activation_fn") or hf.get(
        "sbert_ce_default_activation_function"
    )
    if name is not None and name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"score activation {name!r} in {config}: only {', '.join(_ACTIVATIONS)} are applied"
        )
    sep = hf.get("use_pad_token", hf.get("use_sep_token", True))
    return ScoreConfig(_ACTIVATIONS[name] if name else "sigmoid", bool(sep))  # type: ignore[arg-type]


def score_token_ids(vocab: dict[str, int], tokens: tuple[str, str]) -> tuple[int, int]:
    """The ids of ``tokens`` (false, true), each a token of ``vocab`` (the tokenizer's
    ``get_vocab()``, as ``convert_tokens_to_ids`` reads it); raises ``ConfigError`` naming
    one that is not."""
    ids = []
    for token in tokens:
        if token not in vocab:
            raise ConfigError(
                f"score token {token!r} is not a token of this model's vocabulary (give two "
                "tokens as the tokenizer spells them, e.g. --score-tokens no,yes)"
            )
        ids.append(vocab[token])
    return ids[0], ids[1]


def score_head_kind(config: EngineConfig, cfg: ModelConfig) -> str | None:
    """Which score head the engine builds for ``cfg``'s model (``execution/score_head.py``):
    ``"tokens"`` with ``score_tokens``, ``"classifier"`` for a sequence classifier, None when
    the model cannot score. Raises ``ConfigError`` for score tokens given to a classifier (it
    has its head)."""
    if config.score_tokens is None:
        return "classifier" if cfg.num_labels else None
    if cfg.num_labels:
        raise ConfigError(
            "score tokens are for a causal LM reranker; this checkpoint is a sequence "
            "classifier and scores with its own score head"
        )
    return "tokens"
