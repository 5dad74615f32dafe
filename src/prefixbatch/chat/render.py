"""One chat request through the chat template: checks that the template can render what the
request holds, renders it with its tools and template variables, and decides how its answer is
decoded (the grammar of forced tool calls, special tokens kept for the parsers) and parsed.

The chat template, the tool-call parser and the reasoning parser are chosen once per job
(``ChatOptions``: CLI flags, server options, Python API arguments); ``"auto"`` reads the family
from the template (``tool_parsers.detect_tool_parser``, ``reasoning.detect_reasoning_parser``).
Every problem of one request is a ValueError that becomes that request's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..execution.tool_grammar import tool_call_grammar
from ..sampling_params import SamplingParams
from .reasoning import REASONING_PARSERS, ReasoningParser, detect_reasoning_parser
from .template_source import chat_template_text
from .template_support import TemplateSupport
from .tool_parsers import TOOL_CALL_PARSERS, ToolCallParser, detect_tool_parser
from .tools import ToolRequest

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

AUTO, NONE = "auto", "none"
TEMPLATE_HINT = "give a chat template that does (--chat-template, or chat_template= in Python)"


@dataclass(frozen=True)
class ChatOptions:
    """How a job's chats are rendered and parsed: ``chat_template`` (a template file's path or
    a template's text, kept as the text: ``chat_template_text``) replaces the model's; parsers
    are ``"auto"``, ``"none"`` or a name of ``TOOL_CALL_PARSERS`` / ``REASONING_PARSERS``.
    Raises ValueError for an unknown parser name or a template that is neither."""

    chat_template: str | None = None
    tool_call_parser: str = AUTO
    reasoning_parser: str = AUTO

    def __post_init__(self) -> None:
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", chat_template_text(self.chat_template))
        for value, known in (
            (self.tool_call_parser, TOOL_CALL_PARSERS),
            (self.reasoning_parser, REASONING_PARSERS),
        ):
            if value not in (AUTO, NONE, *known):
                raise ValueError(f"unknown parser {value!r}; use auto, none or {', '.join(known)}")


@dataclass(frozen=True)
class ChatRequest:
    """What one chat request asks of the template (``messages`` as ``check_messages`` gives
    them)."""

    messages: list[dict[str, Any]]
    tools: ToolRequest | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True)
class ReplyFormat:
    """How one answer's text becomes its assistant message: the parsers that apply to it,
    whether its prompt opened a thought, and ``parallel_tool_calls``."""

    tool_parser: ToolCallParser | None = None
    reasoning: ReasoningParser | None = None
    thought_open: bool = False
    parallel_tool_calls: bool = True


@dataclass(frozen=True)
class RenderedChat:
    text: str  # the prompt
    params: SamplingParams  # the request's, with the tool-call grammar and kept special tokens
    reply: ReplyFormat


def _pick(name: str, known: Mapping[str, Any], detected: Any) -> Any:
    return detected if name == AUTO else None if name == NONE else known[name]


class ChatSetup:
    """The template and parsers of one tokenizer under ``options``."""

    def __init__(self, tokenizer: Tokenizer, options: ChatOptions | None = None) -> None:
        options = options or ChatOptions()
        self.tokenizer = tokenizer
        self.template: str | None = options.chat_template or tokenizer.hf.chat_template
        source = self.template or ""
        self.support = TemplateSupport.of(source)
        self.tool_parser: ToolCallParser | None = _pick(
            options.tool_call_parser, TOOL_CALL_PARSERS, detect_tool_parser(source)
        )
        self.reasoning: ReasoningParser | None = _pick(
            options.reasoning_parser, REASONING_PARSERS, detect_reasoning_parser(source)
        )
        self.special_tokens = frozenset(tokenizer.hf.all_special_tokens)

    def check(self, chat: ChatRequest) -> None:
        """Raise ValueError when the template cannot render the request's tools or tool calls,
        or its tool calls could not be parsed from the answer (a model without a template is
        ``render_chat``'s error)."""
        if self.template is None:
            return
        if chat.tools is not None and not self.support.tools:
            raise ValueError(
                f"the chat template cannot render 'tools' (it never reads them); {TEMPLATE_HINT}"
            )
        for i, m in enumerate(chat.messages):
            if m.get("tool_calls") and not self.support.tool_calls:
                raise ValueError(
                    f"the chat template cannot render the tool calls of messages[{i}] (it never "
                    f"reads 'tool_calls'); {TEMPLATE_HINT}"
                )
        if chat.tools is not None and chat.tools.parses_calls and self.tool_parser is None:
            raise ValueError(
                "no tool-call parser knows this chat template's format; choose one with "
                f"--tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})"
            )

    def render(self, chat: ChatRequest, params: SamplingParams) -> RenderedChat:
        """The prompt text, the params to decode it with and the reply format. Raises
        ValueError for anything that stops this request (see ``check``; a template error; a
        forced tool call beside ``response_format``; parameters that do not compile)."""
        self.check(chat)
        tools = chat.tools
        text = self.tokenizer.render_chat(
            chat.messages,
            chat.add_generation_prompt,
            chat.continue_final_message,
            tools=tools.template_tools() if tools else None,
            chat_template=self.template,
            **chat.template_kwargs,
        )
        parser = self.tool_parser if tools is not None and tools.parses_calls else None
        opened = self.reasoning is not None and self.reasoning.opens(text)
        if parser is not None and params.structured is not None:
            raise ValueError(
                "'response_format' / guided decoding cannot be combined with tool calls; "
                'set tool_choice to "none" or drop the output format'
            )
        if parser is not None and tools is not None and tools.forces_calls:
            thought = self.reasoning.syntax(opened) if self.reasoning else None
            syntax = parser.syntax_for(self.template or "")
            parallel = tools.parallel and tools.choice == "required"
            grammar = tool_call_grammar(syntax, tools.signatures(), parallel, thought)
            params = replace(params, structured=grammar)
        markers = (parser.text_markers if parser else ()) + (
            (self.reasoning.start, self.reasoning.end) if self.reasoning else ()
        )
        if params.skip_special_tokens and self.special_tokens.intersection(markers):
            params = replace(params, skip_special_tokens=False)  # the parsers read them
        reply = ReplyFormat(parser, self.reasoning, opened, tools.parallel if tools else True)
        return RenderedChat(text, params, reply)
