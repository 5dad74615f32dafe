"""oneDNN-packed projections against plain ``F.linear`` (the reference), and the engine's use of
them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefixbatch.execution.packed_linear import Linear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 7, 38, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):  # type: ignore[no-untyped-def]
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach()
    x = torch.randn(rows, 96)
    expected = F.linear(x, weight, b)
    layer.pack()
    assert layer.weight.numel() == 0  # the plain copy is dropped
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (rows, 200)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_engine_packs_only_with_fast_kernels(tiny_models):  # type: ignore[no-untyped-def]
    from prefixbatch import LLM

    fast = LLM(str(tiny_models["qwen2"]), device="cpu", kv_cache_memory=2**20)
    plain = LLM(str(tiny_models["qwen2"]), device="cpu", kv_cache_memory=2**20, kernels="torch")
    assert fast.engine.worker.model.layers[0].mlp.down_proj.packed is not None
    assert plain.engine.worker.model.layers[0].mlp.down_proj.packed is None
