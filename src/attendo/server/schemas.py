"""Request bodies of the OpenAI API (and vLLM's /tokenize, /detokenize), validated.

Each body is a pydantic model; `parse` turns any validation failure into a 400 in the OpenAI error
shape naming the offending parameter. Unknown fields are ignored (clients send fields that do not
change the answer, like `user`). The ranges are OpenAI's where OpenAI has the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from attendo.inspect.geometry import MAX_INPUTS
from attendo.inspect.stages import MAX_TOP
from attendo.server.errors import bad_request

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs is an int, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs, as OpenAI
MAX_PROMPTS = 64  # prompts in one completions request
MAX_EMBEDDING_INPUTS = 256

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationBody(_Body):
    """The fields completions and chat share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    return_token_ids: bool = False  # attendo: also the ids and readable strings of the tokens

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_LENGTH} characters")
        return stops

    @model_validator(mode="after")
    def _check_stream_options(self) -> GenerationBody:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_overrides(self) -> dict[str, Any]:
        """The sampler settings this request names (others come from the model's defaults)."""
        chosen = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    def seeds(self) -> list[int | None]:
        """One seed per choice: seed, seed+1, ... so that n choices differ yet reproduce."""
        if self.seed is None:
            return [None] * self.n
        return [(self.seed + i) % 2**64 for i in range(self.n)]


TokenIds = list[int]


class CompletionBody(GenerationBody):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return prompt

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionBody:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it out or set it equal to n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs (prompt logprobs) is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers
    content: str | list[dict[str, Any]] | None = Field(None, validate_default=True)  # after the fields it checks

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[dict[str, Any]] | None, info: ValidationInfo) -> str | None:
        if content is None:
            if not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
                raise ValueError("content is required, except in an assistant message with tool_calls")
            return content
        if isinstance(content, str):
            return content
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)

    @model_validator(mode="after")
    def _tool_call_id(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def as_dict(self) -> dict[str, Any]:
        # The OpenAI "developer" role is the system role of older templates.
        role = "system" if self.role == "developer" else self.role
        extra = {"name": self.name, "tool_call_id": self.tool_call_id,
                 "tool_calls": [c.model_dump() for c in self.tool_calls] if self.tool_calls else None}  # fmt: skip
        return {"role": role, "content": self.content} | {k: v for k, v in extra.items() if v}


class JSONSchemaFormat(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # checked by attendo.prompting.tools, which names the problem
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is not None and not info.data.get("tools"):
            raise ValueError("tool_choice is only allowed when tools are given")
        return choice

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingBody(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must not be empty")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a string or a list of strings (token ids are not supported)")
        if any(not t for t in texts):
            raise ValueError("input strings must not be empty")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return texts

    @model_validator(mode="after")
    def _check_dimensions(self) -> EmbeddingBody:
        if self.dimensions is not None:
            raise ValueError("dimensions (shortened embeddings) is not supported")
        return self


class TokenizeBody(_Body):
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: the prompt a chat with these tools reads
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeBody(_Body):
    model: str = Field(min_length=1)
    tokens: TokenIds


# --- inspection (attendo's own routes, /v1/inspect/...) -------------------------------------
# Their limits are attendo.inspect's own (MAX_TOP tokens per stage, MAX_INPUTS texts).


class StageSettings(_Body):
    """The sampler settings of one step; a missing one is off (not the model's default)."""

    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**64)

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class StagesBody(_Body):
    model: str = Field(min_length=1)
    token_ids: TokenIds = Field(min_length=1)
    settings: StageSettings = Field(default_factory=StageSettings)
    top: int = Field(20, ge=1, le=MAX_TOP)
    chosen: int | None = None


class AttentionBody(_Body):
    model: str = Field(min_length=1)
    text: str | None = None
    token_ids: TokenIds | None = None
    target: str | None = None
    layer: int = 0

    @model_validator(mode="after")
    def _one_of(self) -> AttentionBody:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text and token_ids")
        return self


class GeometryBody(_Body):
    model: str = Field(min_length=1)
    inputs: list[str] = Field(min_length=2, max_length=MAX_INPUTS)
    dims: Literal[2, 3] = 2


Body = TypeVar("Body", bound=BaseModel)
_FIELD_NAMES = {
    name
    for kind in (CompletionBody, ChatBody, Message, StreamOptions, EmbeddingBody, TokenizeBody, DetokenizeBody,
                 ResponseFormat, JSONSchemaFormat, ToolCall, FunctionCall, NamedToolChoice,
                 StageSettings, StagesBody, AttentionBody, GeometryBody)
    for name in kind.model_fields
} | {"schema"}


def parse(kind: type[Body], data: Any) -> Body:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        # Keep field names and list indices; drop pydantic's names for the members of a union.
        known = _FIELD_NAMES | set(kind.model_fields)  # bodies of other modules' routes too
        param = ".".join(str(p) for p in error["loc"] if isinstance(p, int) or p in known) or None
        if error["type"] == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        message = error["msg"].removeprefix("Value error, ")
        shown = json.dumps(error.get("input"), default=str)[:100]
        raise bad_request(f"Invalid value for '{param}': {message} (got {shown}).", param=param) from None
