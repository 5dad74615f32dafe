"""Which request-body fields a batch line may carry: the one list to shrink when a feature lands.

OpenAI rejects a request with a field it does not know; so do we, per line, naming the field,
so that nobody believes an option was applied when it was not. A field listed in
``UNSUPPORTED`` is accepted only with a value that asks for nothing (``"stream": false``,
``"best_of": 1``, ``"functions": []``).
"""

from __future__ import annotations

from typing import Any

from .json_text import json_text

# Fields the engine applies (see the README's field tables).
HONOURED = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "include_stop_str_in_output",
        "min_tokens",
        "skip_special_tokens",
        "n",
        "logprobs",  # chat: bool; completions: int
        "prompt_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_p",
        "response_format",
        "guided_choice",
        "guided_regex",
    }
)
CHAT_ONLY = frozenset(
    {
        "messages",
        "continue_final_message",
        "add_generation_prompt",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
    }
)
COMPLETIONS_ONLY = frozenset({"prompt", "echo"})
# Harmless metadata: accepted and not used (the output's "model" is the model that ran).
METADATA = frozenset({"model", "user", "metadata", "store", "service_tier", "safety_identifier"})
# Not implemented: field -> the values that ask for nothing.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "stream": (False,),
    "stream_options": (),
    "suffix": ("",),
    "functions": ([],),
    "function_call": ("none",),
    "use_beam_search": (False,),
    "reasoning_effort": (),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}


def _asks_nothing(value: Any, defaults: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(d) and value == d for d in defaults)


def field_problem(body: dict[str, Any], chat: bool, ignore: frozenset[str]) -> str | None:
    """Why ``body`` cannot be honoured as written, naming the first offending field, or None.
    ``ignore``: keys that are not body fields (``custom_id`` in the minimal line form)."""
    allowed = HONOURED | METADATA | (CHAT_ONLY if chat else COMPLETIONS_ONLY) | ignore
    for key, value in body.items():
        if key in allowed:
            continue
        if key in UNSUPPORTED:
            if _asks_nothing(value, UNSUPPORTED[key]):
                continue
            return (
                f"'{key}' is not supported yet (got {json_text(value)}); remove it from the request"
            )
        if key in CHAT_ONLY | COMPLETIONS_ONLY:
            where = "/v1/chat/completions" if key in CHAT_ONLY else "/v1/completions"
            return f"'{key}' is only valid for {where}"
        return f"unknown field '{key}'"
    return None


# /v1/responses (``responses_request.py`` maps these onto the chat path). The chat fields that
# keep their meaning there: the sampling options (vLLM takes them as extras), and the tools.
RESPONSES_SAMPLING = HONOURED - {
    "max_tokens",
    "max_completion_tokens",
    "n",
    "logprobs",
    "prompt_logprobs",
    "response_format",
}
RESPONSES_ONLY = frozenset(
    {"input", "instructions", "max_output_tokens", "text", "reasoning", "prompt_cache_key"}
)
# The Responses name of a chat field.
RESPONSES_NAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}
RESPONSES_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "stream_options": (),
    "background": (False,),
    "store": (False,),  # OpenAI keeps a stored response for previous_response_id; we keep none
    "previous_response_id": (),
    "conversation": (),
    "prompt": (),  # a stored prompt template
    "include": ([],),
    "max_tool_calls": (),
    "truncation": ("disabled",),
    "top_logprobs": (0,),
    "prompt_cache_retention": (),
}


def responses_field_problem(body: dict[str, Any]) -> str | None:
    """``field_problem`` for a ``/v1/responses`` body (the minimal line form has none)."""
    allowed = RESPONSES_SAMPLING | RESPONSES_ONLY | (METADATA - {"store"})
    for key, value in body.items():
        if key in allowed or key in ("tools", "tool_choice", "parallel_tool_calls"):
            continue
        if key in RESPONSES_UNSUPPORTED:
            if _asks_nothing(value, RESPONSES_UNSUPPORTED[key]):
                continue
            return (
                f"'{key}' is not supported for /v1/responses (got {json_text(value)}); remove it "
                "from the request"
            )
        if key in RESPONSES_NAMES:
            return f"'{key}' is not a /v1/responses field; use '{RESPONSES_NAMES[key]}'"
        return f"unknown field '{key}' for /v1/responses"
    return None
