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
