"""OpenAI's logprobs shapes on fixed inputs, field for field."""

from __future__ import annotations

from prefixbatch.io.logprobs_format import chat_logprobs, completion_logprobs
from prefixbatch.outputs import TokenLogprob

# id -> bytes: plain ASCII, a leading space, the two halves of "é" (0xC3 0xA9), a whole "é"
VOCAB = [b"Hi", b" there", b"\xc3", b"\xa9", "é".encode()]


def test_chat_shape():
    entries = [
        TokenLogprob(0, -0.25, ((0, -0.25), (1, -1.5))),
        TokenLogprob(2, -3.0, ((4, -0.5), (2, -3.0))),
    ]
    assert chat_logprobs(entries, VOCAB) == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.25,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                    {"token": " there", "logprob": -1.5, "bytes": [32, 116, 104, 101, 114, 101]},
                ],
            },
            {
                "token": "\ufffd",
                "logprob": -3.0,
                "bytes": [0xC3],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
                    {"token": "\ufffd", "logprob": -3.0, "bytes": [0xC3]},
                ],
            },
        ],
        "refusal": None,
    }


def test_chat_without_top_logprobs_has_empty_lists():
    out = chat_logprobs([TokenLogprob(1, -0.5)], VOCAB)
    assert out["content"] == [
        {"token": " there", "logprob": -0.5, "bytes": list(b" there"), "top_logprobs": []}
    ]


def test_completion_shape_adds_the_chosen_token_and_offsets():
    entries = [
        TokenLogprob(1, -0.5, ((1, -0.5),)),
        TokenLogprob(0, -2.0, ((1, -0.3),)),  # chosen token not in the top 1: added
    ]
    assert completion_logprobs(entries, VOCAB, text_offset=5) == {
        "tokens": [" there", "Hi"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{" there": -0.5}, {" there": -0.3, "Hi": -2.0}],
        "text_offset": [5, 11],
    }


def test_completion_echo_leaves_the_first_prompt_token_unscored():
    out = completion_logprobs([TokenLogprob(1, -1.0, ())], VOCAB, unscored=[0])
    assert out == {
        "tokens": ["Hi", " there"],
        "token_logprobs": [None, -1.0],
        "top_logprobs": [None, {" there": -1.0}],
        "text_offset": [0, 2],
    }
