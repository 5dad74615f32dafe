"""Read an OpenAI Batch API input file (or the minimal ``{"custom_id", "prompt"}`` form).

Every non-blank line yields exactly one ``BatchRequest`` or one ``LineError``; nothing in a line
can stop the others from being read. The file is UTF-8 (a byte-order mark is dropped) or, when
it starts with a UTF-16 byte-order mark, UTF-16 as some Windows editors save it; CRLF line ends
are fine. Body fields are checked against ``body_fields.py`` (unknown or not yet supported
fields are a line error naming the field).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..chat.messages import check_messages, check_template_kwargs
from ..chat.render import ChatRequest, ReplyFormat
from ..chat.tools import ToolRequest, parse_tools
from ..errors import RequestError
from ..grammar_spec import GrammarSpec
from ..optional import missing
from ..sampling_params import SamplingParams
from ..tokenizer import TOKEN_BYTES_FEATURE
from .body_fields import field_problem, responses_field_problem
from .embedding_request import EMBEDDINGS_URL, Input, embedding_inputs, embedding_params
from .json_text import json_text
from .responses_request import InputMap, ResponseEcho, chat_body, response_echo
from .score_request import RERANK_URL, SCORE_NAMES, SCORE_URL, Pair, score_request

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
RESPONSES_URL = "/v1/responses"  # runs as a chat (``responses_request.py``)
URLS = (CHAT_URL, COMPLETIONS_URL, RESPONSES_URL, EMBEDDINGS_URL, SCORE_URL, RERANK_URL)
POOLING_URLS = (EMBEDDINGS_URL, SCORE_URL, RERANK_URL)  # prefill only: one request per item


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str  # one of URLS
    messages: list[dict[str, Any]] | None
    prompt: str | list[int] | None
    params: SamplingParams
    request_hash: str  # of the normalised request: a resumed run reuses answers only if equal
    add_generation_prompt: bool = True  # chat: end the prompt with a new assistant turn
    continue_final_message: bool = False  # chat: the answer continues the last message
    echo: bool = False  # completions: the text starts with the prompt
    max_tokens_given: bool = False  # the body sets max_tokens (or max_completion_tokens)
    tools: ToolRequest | None = None  # chat: tools, tool_choice, parallel_tool_calls
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    reply: ReplyFormat | None = None  # chat: how the answer is parsed (set when rendered)
    response_echo: ResponseEcho | None = None  # responses: what the Response object repeats
    input_map: InputMap | None = None  # responses: where its chat messages came from
    # embeddings: the line's inputs as read, scores: its pairs; the job runs each as a request
    # of its own (one ``part`` of ``parts``: its ``prompt``, or its ``pair``) and answers the
    # line once all are done. A rerank part rebuilt for its record (``BatchStore.info``) has
    # its document, which the record repeats, as ``prompt``.
    inputs: tuple[Input | Pair, ...] = ()
    part: int = 0
    parts: int = 1
    pair: Pair | None = None  # a score request's (text_1, text_2)

    @property
    def is_chat(self) -> bool:
        """Whether the request runs through the chat template (chat and responses)."""
        return self.url in (CHAT_URL, RESPONSES_URL)

    def named(self, problem: str) -> str:
        """A problem of this request as its own fields name it: a Responses request's with the
        Responses names (``InputMap.rename``), any other's as it is."""
        if self.url != RESPONSES_URL:
            return problem
        return (self.input_map or InputMap()).rename(problem)

    def chat(self) -> ChatRequest:
        """What this chat request asks of the chat template."""
        return ChatRequest(
            self.messages or [],
            self.tools,
            self.template_kwargs,
            self.add_generation_prompt,
            self.continue_final_message,
        )


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: Any  # as the line wrote it (None when absent or unreadable)
    message: str
    code: str = "invalid_request"


class _Invalid(RequestError):
    """A line's request is invalid; it becomes that line's error record."""


def request_hash(url: str, body: dict[str, Any], max_tokens: int) -> str:
    """16 hex digits of SHA-256 over the request as JSON with sorted keys and no spaces, plus
    the max_tokens it runs with (the default applies when the body sets none)."""
    canonical = json.dumps(
        [url, body, max_tokens], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def decoded_lines(path: Path) -> Iterator[tuple[int, str | LineError]]:
    """(line number, text or the reason it cannot be read) of every line of ``path``, blank
    ones included, decoded as the module docstring says."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            try:
                text = f.read().decode("utf-16")
            except UnicodeDecodeError as e:
                yield 1, LineError(1, None, f"the file starts as UTF-16 but is not valid: {e}")
                return
            yield from enumerate(text.split("\n"), start=1)
            return
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    number,
                    LineError(
                        number,
                        None,
                        f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}: {e.reason}); save the file as UTF-8",
                    ),
                )


def read_batch_file(
    path: Path, default_max_tokens: int = 256
) -> Iterator[BatchRequest | LineError]:
    """Parse ``path`` line by line; a line that cannot be read is an error for that line only."""
    seen: set[str] = set()
    for number, text in decoded_lines(path):
        if isinstance(text, LineError):
            yield text
        elif text.strip():
            yield parse_line(text, number, seen, default_max_tokens)


def load_line(text: str) -> Any:
    """One line's JSON value, read without its line end: an unfinished line then ends at its
    last character, so a decoding error's column lies within the line, as ``json_problem``
    reports it (raises ``json.JSONDecodeError`` or ``RecursionError``)."""
    return json.loads(text.rstrip("\r\n"))


def json_problem(e: json.JSONDecodeError | RecursionError) -> str:
    """What is wrong with one line's JSON, placed by column within that line (the decoder's own
    message counts lines and characters of the text it was given)."""
    if isinstance(e, json.JSONDecodeError):
        # The decoder's own form ("msg: line L column C"): some messages end in "at".
        return f"invalid JSON: {e.msg}: column {e.colno}"
    return "invalid JSON: nested too deeply"


def parse_line(
    text: str, number: int, seen: set[str], default_max_tokens: int = 256
) -> BatchRequest | LineError:
    """One line -> a request or an error; ``seen`` tracks custom_ids for duplicate detection."""
    try:
        obj = load_line(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return LineError(number, None, f"line {number}: {json_problem(e)}")
    if not isinstance(obj, dict):
        return LineError(
            number, None, f"line {number}: expected a JSON object, got {type(obj).__name__}"
        )
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(
            number,
            custom_id,
            f"line {number}: 'custom_id' must be a non-empty string, got {json_text(custom_id)}",
        )
    if custom_id in seen:
        return LineError(
            number, custom_id, f"line {number}: duplicate custom_id {json_text(custom_id)}"
        )
    seen.add(custom_id)
    try:
        return _request(obj, number, custom_id, default_max_tokens)
    except _Invalid as e:
        return LineError(number, custom_id, f"line {number}: {e}")


def _request(
    obj: dict[str, Any], number: int, custom_id: str, default_max_tokens: int
) -> BatchRequest:
    if "body" in obj or "url" in obj:
        method = obj.get("method", "POST")
        if method != "POST":
            raise _Invalid(f"'method' must be POST, got {json_text(method)}")
        url = obj.get("url")
        if url not in URLS:
            raise _Invalid(f"unsupported url {json_text(url)}; use {', '.join(URLS)}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _Invalid("'body' must be a JSON object")
        not_fields: frozenset[str] = frozenset()
    else:  # minimal form: sampling fields sit next to the prompt
        url, body = (CHAT_URL if "messages" in obj else COMPLETIONS_URL), obj
        url = EMBEDDINGS_URL if "input" in obj else url
        url = SCORE_URL if any(n in obj for pair in SCORE_NAMES for n in pair) else url
        url = RERANK_URL if "query" in obj else url
        not_fields = frozenset({"custom_id"})
    if url == EMBEDDINGS_URL:
        return _embedding_request(body, number, custom_id, not_fields)
    if url in (SCORE_URL, RERANK_URL):
        return _score_request(url, body, number, custom_id, not_fields)
    if url == RESPONSES_URL:
        problem = responses_field_problem(body)
    else:
        problem = field_problem(body, url == CHAT_URL, not_fields)
    if problem:
        raise _Invalid(problem)
    digest_body = {k: v for k, v in body.items() if k not in not_fields}
    if url != RESPONSES_URL:
        return _chat_request(url, body, digest_body, number, custom_id, default_max_tokens)
    try:
        chat, input_map = chat_body(body)
        echo = response_echo(body)
    except ValueError as e:
        raise _Invalid(str(e)) from e
    try:  # the chat path's checks name chat fields: give them the Responses names
        req = _chat_request(url, chat, digest_body, number, custom_id, default_max_tokens)
    except _Invalid as e:
        raise _Invalid(input_map.rename(str(e))) from e
    return replace(req, response_echo=echo, input_map=input_map)


def _chat_request(
    url: str,
    body: dict[str, Any],
    digest_body: dict[str, Any],
    number: int,
    custom_id: str,
    default_max_tokens: int,
) -> BatchRequest:
    """A chat or completions line (a Responses line's ``body`` mapped onto chat), its
    ``request_hash`` over ``digest_body``."""
    params = _params(body, default_max_tokens, url != COMPLETIONS_URL)
    given = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    digest = request_hash(url, digest_body, params.max_tokens)
    if url == COMPLETIONS_URL:
        prompt = _prompt(body.get("prompt"))
        echo = _flag(body, "echo", False)
        return BatchRequest(
            number, custom_id, url, None, prompt, params, digest, echo=echo, max_tokens_given=given
        )
    add_generation_prompt = _flag(body, "add_generation_prompt", True)
    continue_final_message = _flag(body, "continue_final_message", False)
    try:
        messages = check_messages(body.get("messages"))
        tools = parse_tools(
            body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
        )
        template_kwargs = check_template_kwargs(body.get("chat_template_kwargs"))
    except ValueError as e:
        raise _Invalid(str(e)) from e
    return BatchRequest(
        number,
        custom_id,
        url,
        messages,
        None,
        params,
        digest,
        add_generation_prompt,
        continue_final_message,
        max_tokens_given=given,
        tools=tools,
        template_kwargs=template_kwargs,
    )


def _embedding_request(
    body: dict[str, Any], number: int, custom_id: str, not_fields: frozenset[str]
) -> BatchRequest:
    """An ``/v1/embeddings`` line (``embedding_request.py``)."""
    body = {k: v for k, v in body.items() if k not in not_fields}
    try:
        params = embedding_params(body)
        inputs = embedding_inputs(body.get("input"))
    except ValueError as e:
        raise _Invalid(str(e)) from e
    digest = request_hash(EMBEDDINGS_URL, body, params.max_tokens)
    return BatchRequest(
        number, custom_id, EMBEDDINGS_URL, None, None, params, digest, inputs=inputs
    )


def _score_request(
    url: str, body: dict[str, Any], number: int, custom_id: str, not_fields: frozenset[str]
) -> BatchRequest:
    """A ``/v1/score`` or ``/v1/rerank`` line (``score_request.py``)."""
    body = {k: v for k, v in body.items() if k not in not_fields}
    try:
        pairs, params = score_request(body, url == RERANK_URL)
    except ValueError as e:
        raise _Invalid(str(e)) from e
    digest = request_hash(url, body, params.max_tokens)
    return BatchRequest(number, custom_id, url, None, None, params, digest, inputs=tuple(pairs))


def _prompt(value: Any) -> str | list[int]:
    if value == "" or value == []:
        raise _Invalid("the prompt is empty")
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return value
    if value is None:
        raise _Invalid("missing 'prompt' (or 'messages' for chat)")
    raise _Invalid("'prompt' must be a string or a list of token ids (one prompt per line)")


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"'{key}' must be a number, got {json_text(value)}")
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"'{key}' must be an integer, got {json_text(value)}")
    return value


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise _Invalid(f"'{key}' must be true or false, got {json_text(value)}")
    return value


def _params(body: dict[str, Any], default_max_tokens: int, chat: bool) -> SamplingParams:
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise _Invalid(f"'max_tokens' must be at least 1, got {max_tokens}")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise _Invalid(f"'temperature' must be in [0, 2], got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _Invalid(f"'top_p' must be in (0, 1], got {top_p}")
    min_tokens = _integer(body, "min_tokens") or 0
    if not 0 <= min_tokens <= max_tokens:
        raise _Invalid(f"'min_tokens' must be in [0, max_tokens={max_tokens}], got {min_tokens}")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str) and stop:
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise _Invalid("'stop' must be a string or a list of non-empty strings")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids
    ):
        raise _Invalid("'stop_token_ids' must be a list of token ids (integers >= 0)")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_integer(body, "top_k") or 0,
        seed=_integer(body, "seed"),
        stop=stop,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_flag(body, "ignore_eos", False),
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output", False),
        min_tokens=min_tokens,
        skip_special_tokens=_flag(body, "skip_special_tokens", True),
        **_features(body, chat),
    )


def _in_range(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = _number(body, key, default)
    if not low <= value <= high:
        raise _Invalid(f"'{key}' must be in [{low:g}, {high:g}], got {value:g}")
    return value


def _count(body: dict[str, Any], key: str, high: int) -> int | None:
    value = _integer(body, key)
    if value is not None and not 0 <= value <= high:
        raise _Invalid(f"'{key}' must be in 0..{high}, got {value}")
    return value


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) as ``SamplingParams`` takes them. Chat: ``logprobs`` true
    with ``top_logprobs`` 0-20; completions: ``logprobs`` 0-5, with ``echo`` also for the
    prompt; vLLM's ``prompt_logprobs`` 0-20 for either."""
    prompt = _count(body, "prompt_logprobs", 20)
    if chat:
        top = _count(body, "top_logprobs", 20)
        if not _flag(body, "logprobs", False):
            if top is not None:
                raise _Invalid("'top_logprobs' needs 'logprobs': true")
            return None, prompt
        return top or 0, prompt
    value = _count(body, "logprobs", 5)
    if value is not None and prompt is None and _flag(body, "echo", False):
        prompt = value
    return value, prompt


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    value = body.get("logit_bias") or {}
    if not isinstance(value, dict):
        raise _Invalid("'logit_bias' must be an object of token id -> bias")
    bias = {}
    for key, v in value.items():
        if not str(key).isdigit():
            raise _Invalid(f"'logit_bias' keys must be token ids, got {json_text(key)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise _Invalid(
                f"'logit_bias' values must be numbers in [-100, 100], got {json_text(v)}"
            )
        bias[int(key)] = float(v)
    return bias


def _features(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The ``SamplingParams`` fields of issue #14: n, log-probabilities, penalties, biases,
    min_p and structured output."""
    n = _integer(body, "n")
    if n is not None and not 1 <= n <= 128:
        raise _Invalid(f"'n' must be in 1..128, got {n}")
    repetition = _number(body, "repetition_penalty", 1.0)
    if repetition <= 0:
        raise _Invalid(f"'repetition_penalty' must be > 0, got {repetition:g}")
    logprobs, prompt_logprobs = _logprobs(body, chat)
    if logprobs is not None or prompt_logprobs is not None:
        absent = missing("xgrammar", TOKEN_BYTES_FEATURE)
        if absent:
            raise _Invalid(absent)
    choice = body.get("guided_choice")
    regex = body.get("guided_regex")
    if regex is not None and not isinstance(regex, str):
        raise _Invalid("'guided_regex' must be a string")
    try:
        structured = GrammarSpec.from_request(body.get("response_format"), choice, regex)
        if structured is not None:
            structured.check()
    except ValueError as e:
        raise _Invalid(str(e)) from e
    return dict(
        n=n or 1,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=_in_range(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_in_range(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=repetition,
        logit_bias=_logit_bias(body),
        min_p=_in_range(body, "min_p", 0.0, 0, 1),
        structured=structured,
    )
