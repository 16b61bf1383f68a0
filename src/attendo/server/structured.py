"""The chat route's structured output and tool calls: from a request body to the prompt's ids and
the grammar the reply must follow, and from the reply's text to OpenAI's message or stream deltas.

response_format {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
constrains the reply to JSON (see attendo.prompting.grammar); tools and tool_choice add the tools
to the prompt and constrain the reply to plain text or calls (see attendo.prompting.tools). Every
problem with a schema or a tool is a 400 here, before anything is generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attendo.errors import AttendoError
from attendo.prompting.grammar import Grammar, GrammarError
from attendo.prompting.tools import Function, ToolCallReader, prompt_messages, read_functions, tool_grammar
from attendo.server.errors import bad_request
from attendo.server.schemas import ChatBody, Message
from attendo.server.served import Served


@dataclass
class ChatPlan:
    """What one chat request generates from and how its replies are read."""

    prompt: list[int]
    grammar: Grammar | None
    calls_tools: bool  # replies may be tool calls: read them with a ToolCallReader
    readers: dict[int, ToolCallReader] = field(default_factory=dict)  # per choice, while streaming

    def deltas(self, index: int, text: str) -> list[dict[str, Any]]:
        """The OpenAI chat deltas for a choice's next piece of text."""
        if not self.calls_tools:
            return [{"content": text}] if text else []
        return self.readers.setdefault(index, ToolCallReader()).feed(text)

    def finish(self, index: int, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        """The choice's last deltas and its finish_reason ("tool_calls" when it called)."""
        if not self.calls_tools:
            return [], finish_reason
        reader = self.readers.setdefault(index, ToolCallReader())
        deltas = reader.finish()
        return deltas, "tool_calls" if reader.called and finish_reason == "stop" else finish_reason

    def message(self, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
        """A whole reply as OpenAI's message fields (content, or tool_calls) and its finish_reason."""
        if not self.calls_tools:
            return {"content": text}, finish_reason
        reader = ToolCallReader()
        reader.feed(text)
        message = reader.message()
        return message, "tool_calls" if reader.called and finish_reason == "stop" else finish_reason


def _functions(tools: list[dict[str, Any]] | None) -> list[Function]:
    try:
        return read_functions(tools or [])
    except GrammarError as e:
        raise bad_request(str(e), param="tools") from None


def _answer_schema(body: ChatBody) -> dict[str, Any] | None:
    """The JSON Schema response_format asks the answer to follow, if any."""
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "object"}
    assert form.json_schema is not None  # the body's validator saw to it
    return form.json_schema.schema_


def conversation(served: Served, messages: list[Message], tools: list[dict[str, Any]] | None) -> tuple[list[dict], dict]:
    """The messages and template variables the chat template renders, tools included."""
    functions = _functions(tools)
    plain = [m.as_dict() for m in messages]
    if not functions and not any(m.get("tool_calls") or m["role"] == "tool" for m in plain):
        return plain, {}
    try:
        return prompt_messages(plain, functions, served.model.tokenizer.supports_tools)
    except GrammarError as e:
        raise bad_request(str(e), param="messages") from None


def plan_chat(served: Served, body: ChatBody) -> ChatPlan:
    choice = body.tool_choice
    choice_name = choice.function.name if choice is not None and not isinstance(choice, str) else choice or "auto"
    functions = _functions(body.tools)
    if functions and choice_name not in ("auto", "required", "none") and all(f.name != choice_name for f in functions):
        raise bad_request(f"tool_choice names a function that is not among the tools: {choice_name!r}", param="tool_choice")
    calling = bool(functions) and choice_name != "none"
    messages, variables = conversation(served, body.messages, body.tools if calling else None)
    try:
        prompt = served.prompts.chat(messages, **variables)
    except AttendoError as e:  # no chat template, or the template refused the conversation
        raise bad_request(str(e), param="messages") from None
    answer = _answer_schema(body)
    try:
        grammar = served.model.grammar(json_schema=answer) if answer is not None else None
    except GrammarError as e:
        raise bad_request(f"response_format: {e}", param="response_format") from None
    if calling:
        try:
            grammar = tool_grammar(served.model.grammar_vocabulary, functions, choice_name, body.parallel_tool_calls, answer)
        except GrammarError as e:
            raise bad_request(str(e), param="tools") from None
    return ChatPlan(prompt, grammar, calling)
