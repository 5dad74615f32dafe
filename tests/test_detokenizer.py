"""Incremental detokenization and vLLM's stop rules, without a model: a small byte-level BPE
tokenizer (characters split across tokens, like GPT-2's) and the word-level test tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_tokenizer
from prefixbatch.detokenizer import (
    IncrementalDetokenizer,
    OutputText,
    OutputTexts,
    find_stop_string,
)
from prefixbatch.execution.penalties import LogitsProcessing, PenaltyState
from prefixbatch.execution.row_faults import Faults
from prefixbatch.sampling_params import SamplingParams
from prefixbatch.scheduling.sequence import Sequence

TEXT = "héllo wörld café naïve 🙂 日本語 the cat sat"


@pytest.fixture(scope="module")
def bpe():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def words(tmp_path_factory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("wordtok")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def pieces(hf, prompt: list[int], output: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(hf, prompt, frozenset(hf.all_special_ids))
    return [detok.decode_next(t) for t in output]


def test_a_character_split_across_tokens_is_emitted_whole(bpe):  # type: ignore[no-untyped-def]
    ids = bpe.encode("🙂 café")
    assert bpe.decode(ids[:1]) == "\ufffd"  # the first token holds half the emoji's bytes
    got = pieces(bpe, bpe.encode("the"), ids)
    assert got == ["", "🙂", " café"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(list(TEXT)), min_size=1, max_size=30), st.integers(0, 40))
def test_pieces_join_to_the_full_decode_and_never_end_mid_character(bpe, chars, cut):  # type: ignore[no-untyped-def]
    ids = bpe.encode("".join(chars))
    got = pieces(bpe, bpe.encode("the cat"), ids)
    assert "".join(got) == bpe.decode(ids)
    partial = "".join(got[:cut])  # stopped on any token: complete characters only
    assert "\ufffd" not in partial and bpe.decode(ids).startswith(partial)


def test_find_stop_string_matches_vllm():  # type: ignore[no-untyped-def]
    assert find_stop_string("The capital is Paris", 6, ["Paris"], False) == 15
    assert find_stop_string("The capital is Paris", 6, ["Paris"], True) == 20
    # only the new text (and what straddles it) is searched: older matches ended nothing
    assert find_stop_string("Paris is big", 4, ["Paris"], False) is None
    assert find_stop_string("ab" + "cd", 2, ["bc"], False) == 1  # straddles the boundary
    # the first string of the list that matches wins, as in vLLM
    assert find_stop_string("xyz", 3, ["z", "x"], False) == 2


def out_text(hf, params: SamplingParams, prompt: list[int], output: list[int], stop_last: bool):  # type: ignore[no-untyped-def]
    """(final text, tokens appended) for ``output`` fed until a stop string ends it."""
    text = OutputText(hf, prompt, params, frozenset(hf.all_special_ids))
    for i, t in enumerate(output):
        if text.append(t, stop_token=stop_last and i == len(output) - 1):
            return text.text, i + 1
    return text.text, len(output)


def test_stop_string_rules(words):  # type: ignore[no-untyped-def]
    prompt, output = words.encode("w5"), words.encode("w10 w11 w12 w13")
    assert out_text(words, SamplingParams(stop=["w12"]), prompt, output, False) == (" w10 w11 ", 3)
    keep = SamplingParams(stop=["w12"], include_stop_str_in_output=True)
    assert out_text(words, keep, prompt, output, False) == (" w10 w11 w12", 3)
    # min_tokens: no stop string is checked until more than min_tokens tokens exist
    late = SamplingParams(stop=["w10"], min_tokens=1)
    assert out_text(words, late, prompt, output, False) == (" w10 w11 w12 w13", 4)


def test_stop_token_text_is_left_out_unless_asked(words):  # type: ignore[no-untyped-def]
    prompt, output = words.encode("w5"), words.encode("w10 </s>")
    plain = SamplingParams(skip_special_tokens=False)
    assert out_text(words, plain, prompt, output, True)[0] == " w10"
    keep = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    assert out_text(words, keep, prompt, output, True)[0] == " w10 </s>"
    skip = SamplingParams(include_stop_str_in_output=True)  # skip_special_tokens by default
    assert out_text(words, skip, prompt, output, True)[0] == " w10"


def seq(seq_id: int, tokens: list[int], params: SamplingParams, num_prompt: int) -> Sequence:
    return Sequence(seq_id, tokens[:num_prompt], num_prompt, params, outputs=tokens[num_prompt:])


def test_a_stop_string_on_the_last_allowed_token_finishes_with_stop(words):  # type: ignore[no-untyped-def]
    prompt = words.encode("w5")
    n = len(prompt)
    params = SamplingParams(max_tokens=2, stop=["w11"])
    texts = OutputTexts(words)
    finished: list[object] = []
    a, b = seq(0, [*prompt, 10], params, n), seq(1, [*prompt, 20], params, n)
    faults: Faults[object] = Faults()
    assert texts.update([a, b], [0, 0], lambda s, r, at: finished.append((s, r)), faults) == []
    a.outputs.append(11)
    a.finish_reason = "length"  # the scheduler ended it on max_tokens with the same token
    b.outputs.append(11)  # running: the stop string ends it through finish()
    record = lambda s, r, at: finished.append((s, r, at))  # noqa: E731
    ended = texts.update([a, b], [1, 1], record, faults)  # their outputs' second token
    assert a.finish_reason == "stop" and texts.pop(a) == " w10 "  # type: ignore[arg-type]
    assert ended == [b] and finished == [(b, "stop", n + 1)] and not faults.errors


@settings(max_examples=40, deadline=None)
@given(
    chars=st.lists(st.sampled_from(list(TEXT)), min_size=0, max_size=12),
    specials=st.lists(st.booleans(), max_size=12),
    ended_by_stop_token=st.booleans(),
    skip=st.booleans(),
    include=st.booleans(),
)
def test_outputs_without_stop_strings_are_decoded_when_they_finish(
    bpe, chars, specials, ended_by_stop_token, skip, include
):  # type: ignore[no-untyped-def]
    """An output without stop strings is decoded only when it finishes (``pop``), into the
    text the step-by-step decode gives, also with special tokens inside it and a stop token
    at its end."""
    eos = bpe.eos_token_id
    output = bpe.encode("".join(chars))
    output = [
        t
        for i, t in enumerate(output)
        for t in ([eos, t] if i < len(specials) and specials[i] else [t])
    ]
    if ended_by_stop_token:
        output.append(eos)
    prompt = bpe.encode("the cat")
    params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=include)
    texts = OutputTexts(bpe)
    s = seq(0, [*prompt], params, len(prompt))
    for token in output:  # the steps: the text is not touched
        s.outputs.append(token)
        assert texts.update([s], [len(s.outputs) - 1], lambda *a: None, Faults()) == []
        assert not texts.texts
    s.finish_reason = "stop" if ended_by_stop_token else "length"
    expected = out_text(bpe, params, prompt, output, ended_by_stop_token)[0]
    assert texts.pop(s) == expected  # type: ignore[arg-type]


def test_min_tokens_masks_eos_and_stop_ids():  # type: ignore[no-untyped-def]
    # The one min_tokens implementation is the logits processing's (penalties.py).
    logits = torch.zeros(3, 8)
    p = SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=(5,))
    no_eos = SamplingParams(max_tokens=5, min_tokens=2, ignore_eos=True)
    outputs = [[3], [3, 4, 6], [3]]  # 1, 3 and 1 output tokens
    seqs = [Sequence(0, [1], 1, q, outputs=list(out)) for q, out in zip([p, p, no_eos], outputs)]
    state = PenaltyState(8, logits.device)
    processing = LogitsProcessing.build(seqs, state, eos_ids=(2, 99), device=logits.device)
    assert processing is not None
    processing.apply(logits)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [2, 5]
    assert not torch.isinf(logits[1]).any()
    assert not torch.isinf(logits[2]).any()  # ignore_eos, no stop ids


def test_special_tokens_inside_an_output_follow_skip_special_tokens(words):  # type: ignore[no-untyped-def]
    prompt, output = words.encode("w5"), words.encode("w10 </s> <s> w11")
    keep = SamplingParams(skip_special_tokens=False)
    assert out_text(words, keep, prompt, output, False)[0] == " w10 </s> <s> w11"
    assert out_text(words, SamplingParams(), prompt, output, False)[0] == " w10 w11"
