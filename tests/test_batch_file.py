"""The batch-file reader: both input forms, every validation rule, and fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefixbatch.io.batch_file import (
    CHAT_URL,
    COMPLETIONS_URL,
    BatchRequest,
    LineError,
    read_batch_file,
)
from prefixbatch.io.body_fields import UNSUPPORTED

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


def test_an_unfinished_line_is_placed_at_its_own_end(tmp_path):  # type: ignore[no-untyped-def]
    """A line missing its closing brace: the column is where the line stops, not column 1 of
    the next line (the line's newline must not count)."""
    good = json.dumps(CHAT)
    bad, ok = read(tmp_path, [good[:-1], good])
    assert isinstance(bad, LineError)
    assert bad.message == f"line 1: invalid JSON: Expecting ',' delimiter: column {len(good)}"
    assert not isinstance(ok, LineError)


def test_an_unterminated_string_is_named_once(tmp_path):  # type: ignore[no-untyped-def]
    """json's message for it ends in "at" ("Unterminated string starting at"): the column
    follows it after a colon, as in the decoder's own form, not after a second "at"."""
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"x": "'
    (bad,) = read(tmp_path, [line])
    assert isinstance(bad, LineError)
    column = line.rindex('"') + 1
    assert bad.message == f"line 1: invalid JSON: Unterminated string starting at: column {column}"


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
        (json.dumps({**CHAT, "url": "/v1/moderations"}), "unsupported url"),
        (json.dumps({**CHAT, "method": "GET"}), "method"),
        (json.dumps({**CHAT, "body": {"max_tokens": 3}}), "'messages'"),
        (json.dumps({**COMPLETION, "body": {"max_tokens": 3}}), "missing 'prompt'"),
        (_with(CHAT, max_tokens=-1), "'max_tokens' must be at least 1"),
        (_with(CHAT, max_tokens="5"), "'max_tokens' must be an integer"),
        (_with(CHAT, temperature=-0.1), "'temperature'"),
        (_with(CHAT, temperature="hot"), "'temperature' must be a number"),
        (_with(CHAT, top_p=0), "'top_p'"),
        (_with(CHAT, top_p=1.5), "'top_p'"),
        (_with(CHAT, n=0), "'n' must be in 1..128"),
        (_with(CHAT, top_logprobs=3), "'top_logprobs' needs 'logprobs': true"),
        (_with(CHAT, logprobs=True, top_logprobs=21), "'top_logprobs' must be in 0..20"),
        (_with(CHAT, logprobs=1), "'logprobs' must be true or false"),
        (_with(COMPLETION, logprobs=6), "'logprobs' must be in 0..5"),
        (_with(CHAT, presence_penalty=3), "'presence_penalty' must be in [-2, 2]"),
        (_with(CHAT, repetition_penalty=0), "'repetition_penalty' must be > 0"),
        (_with(CHAT, min_p=1.5), "'min_p' must be in [0, 1]"),
        (_with(CHAT, logit_bias={"x": 1}), "'logit_bias' keys must be token ids"),
        (_with(CHAT, logit_bias={"5": 101}), "'logit_bias' values"),
        (_with(CHAT, response_format={"type": "xml"}), "unsupported response_format type"),
        (
            _with(CHAT, response_format={"type": "json_schema", "json_schema": {"schema": 3}}),
            "json_schema.schema",
        ),
        (
            _with(
                CHAT,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                },
            ),
            "cannot compile json_schema",
        ),
        (_with(CHAT, guided_regex="a(("), "cannot compile regex"),
        (_with(CHAT, guided_choice=[]), "guided_choice"),
        (_with(CHAT, guided_choice=["a"], guided_regex="a"), "only one of"),
        (_with(CHAT, echo=True), "'echo' is only valid for /v1/completions"),
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
    assume(not data.startswith((b"\xff\xfe", b"\xfe\xff")))  # UTF-16: tested on its own
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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("stream", True),
        ("best_of", 3),
        ("suffix", "x"),
        ("unknown_option", 1),
    ],
)
def test_fields_not_honoured_are_a_line_error_naming_them(tmp_path, key, value):  # type: ignore[no-untyped-def]
    ok, bad = read(tmp_path, [json.dumps(MINIMAL), _with(CHAT, **{key: value})])
    assert isinstance(ok, BatchRequest) and isinstance(bad, LineError)
    assert f"'{key}'" in bad.message and bad.custom_id == "a"
    assert ("not supported yet" if key in UNSUPPORTED else "unknown field") in bad.message


def test_harmless_metadata_and_values_that_ask_for_nothing_are_accepted(tmp_path):  # type: ignore[no-untyped-def]
    body = dict(
        model="gpt-4o-mini",
        user="u1",
        metadata={"k": "v"},
        store=False,
        stream=False,
        logprobs=False,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        tools=[],
        response_format={"type": "text"},
    )
    (req,) = read(tmp_path, [_with(CHAT, **body)])
    assert isinstance(req, BatchRequest)
    assert req.params.logprobs is None and req.params.n == 1 and req.params.structured is None
    # 0 is not false: on /v1/completions "logprobs": 0 asks for the sampled token's logprob.
    (zero,) = read(tmp_path, [json.dumps(COMPLETION | {"body": {"prompt": "x", "logprobs": 0}})])
    assert isinstance(zero, BatchRequest) and zero.params.logprobs == 0
    (wrong_url,) = read(tmp_path, [json.dumps(COMPLETION | {"body": {"messages": []}})])
    assert isinstance(wrong_url, LineError)
    assert "'messages' is only valid for /v1/chat/completions" in wrong_url.message


def test_vllm_fields_parse(tmp_path):  # type: ignore[no-untyped-def]
    extra = dict(
        include_stop_str_in_output=True,
        min_tokens=2,
        skip_special_tokens=False,
        stop_token_ids=[7],
        ignore_eos=True,
        continue_final_message=True,
        add_generation_prompt=False,
    )
    (req,) = read(tmp_path, [_with(CHAT, **extra)])
    assert isinstance(req, BatchRequest)
    p = req.params
    assert p.include_stop_str_in_output and p.min_tokens == 2 and not p.skip_special_tokens
    assert p.stop_token_ids == (7,) and p.ignore_eos
    assert req.continue_final_message and not req.add_generation_prompt
    (bad,) = read(tmp_path, [_with(CHAT, min_tokens=9)])  # max_tokens is 5
    assert isinstance(bad, LineError) and "'min_tokens' must be in [0, max_tokens=5]" in bad.message


def test_content_parts_join_with_newline_and_roles_are_kept(tmp_path):  # type: ignore[no-untyped-def]
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "this?"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    (req,) = read(tmp_path, [_with(CHAT, messages=messages)])
    assert isinstance(req, BatchRequest)
    assert req.messages == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What is\nthis?"},
    ]


def test_request_hash_ignores_layout_and_follows_the_request(tmp_path):  # type: ignore[no-untyped-def]
    spaced = json.dumps(CHAT, indent=None, separators=(", ", ": "))
    reordered = json.dumps({**CHAT, "body": dict(reversed(list(CHAT["body"].items())))})
    a, b = read(tmp_path, [spaced, reordered.replace('"a"', '"a2"', 1)])
    assert a.request_hash == b.request_hash  # type: ignore[union-attr]
    (c,) = read(tmp_path, [_with(CHAT, max_tokens=6)])
    assert c.request_hash != a.request_hash  # type: ignore[union-attr]
    # the default max_tokens is part of the request when the body sets none
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(MINIMAL | {"max_tokens": None}) + "\n")
    d1 = next(read_batch_file(path, default_max_tokens=8))
    d2 = next(read_batch_file(path, default_max_tokens=9))
    assert d1.request_hash != d2.request_hash  # type: ignore[union-attr]


def test_non_string_custom_id_is_kept_in_the_error(tmp_path):  # type: ignore[no-untyped-def]
    (bad,) = read(tmp_path, [json.dumps(MINIMAL | {"custom_id": 17})])
    assert isinstance(bad, LineError) and bad.custom_id == 17
    assert "'custom_id' must be a non-empty string, got 17" in bad.message


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_byte_order_marks_and_utf16(tmp_path, encoding):  # type: ignore[no-untyped-def]
    text = json.dumps(MINIMAL | {"prompt": "café"}) + "\r\n" + json.dumps(COMPLETION) + "\r\n"
    path = tmp_path / "bom.jsonl"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    path.write_bytes(data)
    first, second = read_batch_file(path)
    assert isinstance(first, BatchRequest) and first.prompt == "café" and first.line == 1
    assert isinstance(second, BatchRequest) and second.line == 2


def test_a_latin1_line_says_what_is_wrong(tmp_path):  # type: ignore[no-untyped-def]
    (bad,) = read(
        tmp_path, [json.dumps(MINIMAL | {"prompt": "café"}, ensure_ascii=False).encode("latin-1")]
    )
    assert isinstance(bad, LineError)
    assert bad.message.startswith("line 1: not valid UTF-8 (byte 0xe9 at column")
    assert "save the file as UTF-8" in bad.message


def test_feature_fields_parse(tmp_path):  # type: ignore[no-untyped-def]
    from prefixbatch.grammar_spec import GrammarSpec

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = _with(
        CHAT,
        n=3,
        logprobs=True,
        top_logprobs=4,
        presence_penalty=0.5,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        logit_bias={"7": -100, "9": 2.5},
        min_p=0.1,
        prompt_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    echo = json.dumps(COMPLETION | {"body": {"prompt": "x", "logprobs": 2, "echo": True}})
    choice = _with(CHAT | {"custom_id": "g"}, guided_choice=["yes", "no"])
    (c, e, g) = read(tmp_path, [chat, echo, choice])
    assert isinstance(c, BatchRequest) and isinstance(e, BatchRequest)
    assert isinstance(g, BatchRequest)
    p = c.params
    assert (p.n, p.logprobs, p.prompt_logprobs, p.min_p) == (3, 4, 2, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1, 1.2)
    assert p.logit_bias == ((7, -100.0), (9, 2.5))
    assert p.structured == GrammarSpec("json_schema", json.dumps(schema))
    assert e.echo and (e.params.logprobs, e.params.prompt_logprobs) == (2, 2)
    assert g.params.structured is not None and g.params.structured.kind == "choice"
    # The resume hash covers the new fields: a changed n is a different request.
    (c2,) = read(tmp_path, [chat.replace('"n": 3', '"n": 2')])
    assert isinstance(c2, BatchRequest) and c2.request_hash != c.request_hash
