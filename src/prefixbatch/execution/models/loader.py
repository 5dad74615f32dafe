"""Build a family's model on the device and load a checkpoint into it.

The model is built on the meta device (no memory), given its dtype there, and allocated once on
the target device: weights are never materialised in fp32 first (gpt-fast's meta-device build).
Then the checkpoint loop is short (the ``weight_loader`` pattern of vLLM and nano-vllm): each
checkpoint tensor is handed to the parameter it belongs to, whose owning module loads it (a
merged projection copies its shard; a plain parameter is copied whole). A tensor-parallel
loader would cut its rank's slice in the same place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...config import ModelConfig
from ...errors import ModelNotFoundError
from .family import CausalLM, ModelFamily

Weights = Iterable[tuple[str, torch.Tensor]]  # (checkpoint name, tensor), in checkpoint order


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
    """Copy ``tensor`` into the whole of ``param`` (converting its dtype). Raises ValueError
    when the shapes differ or a shard is asked of a parameter that has none."""
    if shard is not None:
        raise ValueError(f"shard {shard} of a parameter that is not merged")
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} where {tuple(param.shape)} is expected")
    param.data.copy_(tensor)


def load_checkpoint(model: CausalLM, weights: Weights) -> None:
    """Load every ``(name, tensor)`` of a checkpoint into ``model`` through its parameters'
    loaders, then let the model finish (ties, derived buffers).

    Raises ``ModelNotFoundError`` for a tensor the model has no parameter for, a tensor of the
    wrong shape, or a parameter the checkpoint leaves (partly) unset.
    """
    params = dict(model.named_parameters())
    filled: dict[str, set[int | None]] = {}  # parameter -> the shards loaded into it
    for name, tensor in weights:
        where = model.parameter_for(name)
        if where is None:
            continue
        target, shard = where
        if target not in params:
            raise ModelNotFoundError(f"checkpoint tensor {name!r} has no place in the model")
        owner = model.get_submodule(target.rpartition(".")[0])
        loader = getattr(owner, "weight_loader", default_weight_loader)
        try:
            loader(params[target], tensor, shard)
        except ValueError as e:
            raise ModelNotFoundError(f"checkpoint tensor {name!r}: {e}") from e
        filled.setdefault(target, set()).add(shard)
    loaded = {
        name for name, shards in filled.items() if None in shards or shards >= model.shards_of(name)
    }
    model.finish_loading(loaded)
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelNotFoundError(f"the checkpoint has no tensor for {', '.join(missing[:3])}{more}")


def build_model(
    family: ModelFamily,
    cfg: ModelConfig,
    weights: Weights,
    device: torch.device,
    dtype: torch.dtype,
) -> CausalLM:
    """``family``'s model for ``cfg`` with the checkpoint's ``weights``, allocated once in
    ``dtype`` on ``device``, in eval mode. Raises ``ModelNotFoundError`` as
    ``load_checkpoint`` does."""
    with torch.device("meta"):
        model = family.model(cfg)
    model.to(dtype)  # meta tensors: a change of dtype allocates nothing
    model.to_empty(device=device)
    load_checkpoint(model, weights)
    return model.eval()
