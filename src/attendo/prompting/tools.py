"""Tool calls (OpenAI function calling): tools into the prompt, a grammar for the reply, calls out.

The way in: a chat template that reads a `tools` variable (the transformers convention) gets the
tools, the assistant's earlier calls and the tools' results as they are. Any other template gets
them as text in this documented format, which is the Hermes/Qwen convention of tags:

    system prompt, after the caller's own:  the tools as JSON lines inside <tools></tools>, and
                                            how to call them
    an assistant's earlier call:            <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
    a tool's result (a user turn):          <tool_response>\\n...\\n</tool_response>

The reply is constrained by a grammar (prompting.grammar) in that same call form, so a call
always names a given function and its arguments always validate against the function's
parameters:
- tool_choice "required": one call (or several, with parallel_tool_calls) and nothing else;
- a named function: exactly one call of it;
- "auto": either plain text that holds none of the format's tags, or calls and nothing else. Then a
  reply never holds a half-made call, and reading it is certain, where detecting calls in free text
  after the fact would have to guess at malformed ones;
- "none": the tools stay out of the prompt and the reply is free text.

The way out: `ToolCallReader` turns the reply's text, streamed or whole, into content or calls
(OpenAI's `tool_calls`, with streaming deltas).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from attendo.prompting.grammar import JSON_LAYOUT, GrammarError, Vocabulary, schema_of

CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}}

SYSTEM_PROMPT = """You can call functions to get what you need to answer. The functions, one JSON object per line:
<tools>
{tools}
</tools>
To call functions, reply with the calls and nothing else, each one as
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments as JSON>}}}}
</tool_call>
Each result comes back inside <tool_response></tool_response>. When you have what you need, answer in plain text."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_tool(self) -> dict[str, Any]:
        """The OpenAI tool object (what templates that read `tools` expect)."""
        described = {"description": self.description} if self.description else {}
        return {"type": "function", "function": {"name": self.name, **described, "parameters": self.parameters}}


def read_functions(tools: list[dict[str, Any]]) -> list[Function]:
    """OpenAI tools ([{"type": "function", "function": {...}}]) checked; GrammarError names the problem."""
    functions: list[Function] = []
    for index, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(spec, dict):
            raise GrammarError(f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise GrammarError(f"tools[{index}].function.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if any(f.name == name for f in functions):
            raise GrammarError(f"tools[{index}]: two functions are named {name!r}")
        parameters = spec.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise GrammarError(f"tools[{index}].function.parameters must be a JSON Schema object")
        functions.append(Function(name, spec.get("description"), parameters))
    return functions


def _call_schema(function: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(
    vocabulary: Vocabulary,
    functions: list[Function],
    choice: str,
    parallel: bool,
    answer_schema: dict[str, Any] | None = None,
) -> Any:
    """The reply's grammar for tool_choice `choice` ("auto", "required" or a function's name);
    answer_schema: what a plain answer must be instead of free text (response_format)."""
    called = [f for f in functions if f.name == choice] if choice not in ("auto", "required") else functions
    for function in called:  # each schema on its own, so an error names its function
        try:
            vocabulary.json_schema(function.parameters)
        except GrammarError as e:
            raise GrammarError(f"function {function.name!r}: parameters: {str(e).removeprefix('json_schema: ')}") from None
    schema = _call_schema(called[0]) if len(called) == 1 else {"anyOf": [_call_schema(f) for f in called]}
    schema["x-guidance"] = JSON_LAYOUT  # read at the top of each %json only
    repeat = ' ("\\n" call)*' if parallel and choice in ("auto", "required") else ""
    answer = "TEXT" if answer_schema is None else f"%json {json.dumps({**schema_of(answer_schema), 'x-guidance': JSON_LAYOUT})}"
    lines = [
        "start: calls" if choice != "auto" else "start: answer | calls",
        f"answer: {answer}",
        f"calls: call{repeat}",
        f"call: {json.dumps(CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(CALL_CLOSE)}",
        # any text in which the format's tags never appear
        "TEXT: /(.|\\n)+/ & ~/(.|\\n)*<tool_(call|response)>(.|\\n)*/",
    ]
    return vocabulary.lark("\n".join(lines))


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise GrammarError(f"the arguments of an earlier call of {function.get('name')!r} are not JSON") from None
    body = json.dumps({"name": function.get("name"), "arguments": parsed}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def prompt_messages(
    messages: list[dict[str, Any]], functions: list[Function], template_reads_tools: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template variables a chat template gets for a conversation with tools.

    messages are OpenAI's: assistant turns may carry tool_calls (and no content), tool turns a
    tool_call_id. Every string stays the caller's, so encode_chat keeps it text."""
    if template_reads_tools:
        native = []
        for message in messages:
            message = {**message, "content": message.get("content") or ""}
            if message.get("tool_calls"):
                message["tool_calls"] = [_native_call(c) for c in message["tool_calls"]]
            native.append(message)
        return native, ({"tools": [f.as_tool() for f in functions]} if functions else {})
    shown: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if shown and shown[-1].get("tool_responses"):  # several results answer one turn of calls
                shown[-1]["content"] += "\n" + response
            else:
                shown.append({"role": "user", "content": response, "tool_responses": True})
        elif message.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in message["tool_calls"])
            content = message.get("content") or ""
            shown.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        else:
            shown.append({"role": message["role"], "content": message.get("content") or ""})
    shown = [{k: v for k, v in m.items() if k != "tool_responses"} for m in shown]
    if functions:
        listing = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(f.as_tool(), ensure_ascii=False) for f in functions))
        if shown and shown[0]["role"] == "system":
            shown[0] = {**shown[0], "content": f"{shown[0]['content']}\n\n{listing}"}
        else:
            shown.insert(0, {"role": "system", "content": listing})
    return shown, {}


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as transformers' templates expect it: arguments as a dict."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            raise GrammarError(f"the arguments of an earlier call of {function.get('name')!r} are not JSON") from None
    return {**call, "type": "function", "function": function}


@dataclass
class _Call:
    id: str
    name: str | None = None
    sent: int = 0  # characters of the arguments already sent


@dataclass
class ToolCallReader:
    """A reply's text, fed as it streams, read as content or as tool calls.

    `feed(piece)` and `finish()` return OpenAI chat deltas ({"content": ...} or {"tool_calls":
    [...]}); joined, a call's argument deltas are its arguments. `message()` is the whole reply
    as OpenAI's message fields. The text is in the grammar's form, so the reading is exact."""

    text: str = ""
    calls: list[_Call] = field(default_factory=list)
    _content_sent: int = 0
    _mode: str = "undecided"  # then "content" or "calls"

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        return self._deltas(final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(final=True)

    @property
    def called(self) -> bool:
        return self._mode == "calls"

    def message(self) -> dict[str, Any]:
        """The reply as OpenAI's message fields. Only whole calls count: a reply cut off by the
        token limit inside its first call is returned as the text it is."""
        self.finish()
        whole = [(c, b) for c, b in zip(self.calls, self._bodies()) if CALL_CLOSE in b]
        if not self.called or not whole:
            return {"content": self.text}
        calls = [self._call_object(i, c, _arguments(b) or "") for i, (c, b) in enumerate(whole)]
        return {"content": None, "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls]}

    def _deltas(self, final: bool) -> list[dict[str, Any]]:
        if self._mode == "undecided":
            if self.text.startswith(CALL_OPEN):
                self._mode = "calls"
            elif final or not CALL_OPEN.startswith(self.text):
                self._mode = "content"
            else:
                return []
        if self._mode == "content":
            piece, self._content_sent = self.text[self._content_sent :], len(self.text)
            return [{"content": piece}] if piece else []
        deltas = []
        for index, body in enumerate(self._bodies()):
            if index == len(self.calls):
                self.calls.append(_Call(f"call_{uuid.uuid4().hex[:24]}"))
            call = self.calls[index]
            closed = CALL_CLOSE in body
            arguments = _arguments(body)
            if arguments is None:
                continue  # the name is not complete yet
            if call.name is None:
                call.name = json.loads(body[len(CALL_OPEN) :].split(", ", 1)[0].split(": ", 1)[1])
                deltas.append({"tool_calls": [self._call_object(index, call, "")]})
            # Hold back what may yet turn out to be the body's closing "}" and "</tool_call>".
            ready = len(arguments) if closed or final else max(call.sent, len(arguments) - len("}" + CALL_CLOSE))
            if ready > call.sent:
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments[call.sent : ready]}}]})
                call.sent = ready
        return deltas

    def _bodies(self) -> list[str]:
        """Each call's text so far, from its "<tool_call>\\n" to its "\\n</tool_call>" (if there yet)."""
        starts = [m.start() for m in re.finditer(re.escape(CALL_OPEN), self.text)]
        return [self.text[a : b if b is not None else len(self.text)] for a, b in zip(starts, [*starts[1:], None])]

    @staticmethod
    def _call_object(index: int, call: _Call, arguments: str) -> dict[str, Any]:
        return {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


_ARGUMENTS_KEY = ', "arguments": '


def _arguments(body: str) -> str | None:
    """The arguments' JSON text in a call's text so far; None until the name is complete."""
    at = body.find(_ARGUMENTS_KEY)
    if at < 0:
        return None
    arguments = body[at + len(_ARGUMENTS_KEY) :]
    closing = "}" + CALL_CLOSE
    end = arguments.find(closing)
    return arguments[:end] if end >= 0 else arguments
