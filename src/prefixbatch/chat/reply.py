"""An answer's text as OpenAI's assistant message: the thought split off first (reasoning
parser), then the tool calls out of what is left (tool-call parser), as vLLM orders them.

``finish_reason`` becomes ``"tool_calls"`` when the answer ended by itself and called a tool
(OpenAI: "the model called a tool"); an answer cut by ``max_tokens`` stays ``"length"``, with
the calls completed before the cut. Call ids are derived from ``key`` (the request's id and
choice), so a rerun writes the same ids.
"""

from __future__ import annotations

from ..outputs import AssistantMessage, ToolCall
from .render import ReplyFormat


def assistant_message(
    text: str, finish_reason: str, reply: ReplyFormat | None, key: str
) -> tuple[AssistantMessage, str]:
    """(message, finish_reason) of one choice; ``reply`` None: the text is the content."""
    if reply is None:
        return AssistantMessage(text), finish_reason
    reasoning, content = None, text
    if reply.reasoning is not None:
        reasoning, content = reply.reasoning.split(text, reply.thought_open)
    calls: list[ToolCall] = []
    parser = reply.tool_parser
    if parser is not None and content is not None:
        content, parsed = parser.parse(content)
        if not reply.parallel_tool_calls:
            parsed = parsed[:1]  # OpenAI: at most one call
        calls = [
            ToolCall(parser.call_id(f"{key}:{i}"), c.name, c.arguments)
            for i, c in enumerate(parsed)
        ]
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return AssistantMessage(content, reasoning, tuple(calls)), finish_reason
