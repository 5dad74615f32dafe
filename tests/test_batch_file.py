"""The batch-file reader: both input forms, every validation rule, and fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixbatch.io.batch_file import (
    CHAT_URL,
    COMPLETIONS_URL,
    BatchRequest,
    LineError,
    read_batch_file,
)

CHAT = {
    "custom_id": "a",
    "method": "POST",
    "url": CHAT_URL,
    "body": {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["x", "y"],
        "n": 1,
    },
}
COMPLETION = {
    "custom_id": "b",
    "method": "POST",
    "url": COMPLETIONS_URL,
    "body": {"prompt": "hello", "max_completion_tokens": 7, "stop": "z"},
}
MINIMAL = {"custom_id": "c", "prompt": "hey", "max_tokens": 3, "temperature": 0}


def read(tmp_path: Path, lines: list[str | bytes]) -> list[BatchRequest | LineError]:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return list(read_batch_file(path))


def test_both_forms_parse(tmp_path):  # type: ignore[no-untyped-def]
    chat, completion, minimal = read(tmp_path, [json.dumps(x) for x in (CHAT, COMPLETION, MINIMAL)])
    assert isinstance(chat, BatchRequest) and chat.url == CHAT_URL
    assert chat.messages == [{"role": "user", "content": "hi"}]
    assert (chat.params.max_tokens, chat.params.temperature, chat.params.top_p) == (5, 0.5, 0.9)
    assert chat.params.seed == 3 and chat.params.stop == ("x", "y") and chat.line == 1
    assert isinstance(completion, BatchRequest) and completion.prompt == "hello"
    assert completion.params.max_tokens == 7 and completion.params.stop == ("z",)
    assert isinstance(minimal, BatchRequest) and minimal.url == COMPLETIONS_URL
    assert minimal.params.greedy and minimal.params.max_tokens == 3


def _with(base, **body):  # type: ignore[no-untyped-def]
    obj = json.loads(json.dumps(base))
    obj["body"].update(body)
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "x"}), "'custom_id'"),
        (json.dumps({**CHAT, "url": "/v1/embeddings"}), "unsupported url"),
        (json.dumps({**CHAT, "method": "GET"}), "method"),
        (json.dumps({**CHAT, "body": {"max_tokens": 3}}), "'messages'"),
        (json.dumps({**COMPLETION, "body": {"max_tokens": 3}}), "missing 'prompt'"),
        (_with(CHAT, max_tokens=-1), "'max_tokens' must be at least 1"),
        (_with(CHAT, max_tokens="5"), "'max_tokens' must be an integer"),
        (_with(CHAT, temperature=-0.1), "'temperature'"),
        (_with(CHAT, temperature="hot"), "'temperature' must be a number"),
        (_with(CHAT, top_p=0), "'top_p'"),
        (_with(CHAT, top_p=1.5), "'top_p'"),
        (_with(CHAT, n=2), "'n' must be 1"),
        (_with(CHAT, stop=[1]), "'stop'"),
        (_with(CHAT, messages=[{"role": "user", "content": ""}]), "empty"),
        (_with(COMPLETION, prompt=""), "empty"),
        (_with(COMPLETION, prompt=["a", "b"]), "'prompt'"),
    ],
)
def test_invalid_lines_give_one_clear_error(tmp_path, line, message):  # type: ignore[no-untyped-def]
    third = json.dumps(COMPLETION | {"custom_id": "d"})
    ok, bad, ok2 = read(tmp_path, [json.dumps(MINIMAL), line, third])
    assert isinstance(ok, BatchRequest) and isinstance(ok2, BatchRequest)
    assert isinstance(bad, LineError)
    assert message in bad.message and bad.message.startswith("line 2:") and bad.line == 2


def test_duplicate_custom_id_and_bad_utf8(tmp_path):  # type: ignore[no-untyped-def]
    items = read(tmp_path, [json.dumps(MINIMAL), b"\xff\xfe", json.dumps(MINIMAL), ""])
    assert isinstance(items[0], BatchRequest)
    assert isinstance(items[1], LineError) and "UTF-8" in items[1].message
    assert isinstance(items[2], LineError) and "duplicate custom_id" in items[2].message
    assert items[2].custom_id == "c" and len(items) == 3  # the blank line is skipped


def _non_blank_lines(data: bytes) -> int:
    """Lines as a file iterator splits them (on \\n only); undecodable ones count."""
    count = 0
    for raw in data.split(b"\n"):
        try:
            count += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            count += 1
    return count


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(tmp_path, data):  # type: ignore[no-untyped-def]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    items = list(read_batch_file(path))
    assert len(items) == _non_blank_lines(data)
    assert [i.line for i in items] == sorted(i.line for i in items)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from([CHAT, COMPLETION, MINIMAL]),
    key=st.sampled_from(
        [
            "custom_id",
            "url",
            "method",
            "body",
            "messages",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "top_k",
            "ignore_eos",
            "stop_token_ids",
        ]
    ),
    value=json_values,
    in_body=st.booleans(),
)
def test_mutated_lines_yield_one_result_each(tmp_path, base, key, value, in_body):  # type: ignore[no-untyped-def]
    obj = json.loads(json.dumps(base))
    target = obj["body"] if in_body and "body" in obj else obj
    target[key] = value
    path = tmp_path / "mut.jsonl"
    path.write_text(json.dumps(obj) + "\n" + json.dumps(MINIMAL | {"custom_id": "zz"}) + "\n")
    items = list(read_batch_file(path))
    assert len(items) == 2 and isinstance(items[1], BatchRequest)
    assert isinstance(items[0], (BatchRequest, LineError))
