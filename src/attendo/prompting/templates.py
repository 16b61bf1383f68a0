"""Prompt templates and few-shot examples, rendered into the prompt a model is given.

A template is a Jinja file rendered in the same sandbox as chat templates (attendo.tokenizer),
with undefined variables an error rather than empty text. It sees its variables (`--var
NAME=VALUE`), `examples` (the chosen few-shot examples, each with `.input` and `.output`) and
`input` (the question to answer, when one is given). Examples come from a JSONL file, one
`{"input": ..., "output": ...}` per line; `choose_examples` takes the first K in file order, or K
drawn at random when given a seed.

How the parts are laid out (`prompt_turns`): a template that uses `examples` lays out the whole
prompt itself. A template that does not is the instruction, and what it leaves out follows it as
turns: each example as an input turn and an output turn, then the input as the last input turn,
whose output the model writes. For a chat model (one with a chat template) the turns are chat
messages (the instruction as the system message when turns follow it, else as the one user
message) rendered by the model's chat template; for a completion model they are text blocks
"Input: ...\\nOutput: ..." after the instruction.

The API (used by `attendo prompt` and `attendo eval`):

    template = PromptTemplate.from_file("task.jinja")       # or PromptTemplate(source_text)
    chosen = choose_examples(read_examples("shots.jsonl"), shots=3)   # seed=N: 3 at random
    prompt = render_prompt(model, template, {"topic": "tea"}, chosen, input="the question", max_new_tokens=32)
    prompt.text, prompt.messages, prompt.token_count, prompt.window    # what the model sees
    result = complete(model, prompt, max_new_tokens=32, do_sample=False)

render_prompt raises ContextLengthError when the prompt and the new tokens do not fit the model's
context window, saying how many examples would fit; nothing is ever cut off silently.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError

from attendo.datafiles import read_jsonl
from attendo.errors import AttendoError, ContextLengthError, InvalidSettingError, UnsupportedModelError
from attendo.model import DEFAULT_MAX_NEW_TOKENS
from attendo.tokenizer import template_environment

EXAMPLES = "examples"
INPUT = "input"
INPUT_LABEL = "Input:"
OUTPUT_LABEL = "Output:"


class PromptTemplateError(AttendoError):
    """A template that does not parse or render, or examples that cannot be read."""


@dataclass(frozen=True)
class Example:
    input: str
    output: str


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSONL file: one {"input": str, "output": str} object per non-blank line."""
    path = Path(path)
    examples = []
    for number, record in read_jsonl(path, PromptTemplateError, expected='an object {"input": ..., "output": ...}'):
        where = f"{path}:{number}"
        for key in (INPUT, "output"):
            if not isinstance(record.get(key), str):
                problem = "is missing" if key not in record else "must be a string"
                raise PromptTemplateError(f'{where}: "{key}" {problem}')
        examples.append(Example(record[INPUT], record["output"]))
    if not examples:
        raise PromptTemplateError(f"{path} holds no examples")
    return examples


def choose_examples(examples: list[Example], shots: int, seed: int | None = None) -> list[Example]:
    """The first `shots` examples in file order, or (with a seed) `shots` of them at random."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise InvalidSettingError(f"shots must be an integer >= 0, got {shots!r}")
    if shots > len(examples):
        raise InvalidSettingError(f"{shots} shots asked for, but there are only {len(examples)} examples")
    if seed is None:
        return examples[:shots]
    return random.Random(seed).sample(examples, shots)


class PromptTemplate:
    def __init__(self, source: str, name: str = "template") -> None:
        self.name = name
        environment = template_environment().overlay(undefined=jinja2.StrictUndefined)
        try:
            self.variables = frozenset(meta.find_undeclared_variables(environment.parse(source)))
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PromptTemplateError(f"{name}:{e.lineno}: {e.message}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTemplate:
        path = Path(path)
        try:
            return cls(path.read_text(encoding="utf-8"), name=str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise PromptTemplateError(f"cannot read template {path}: {e}") from None

    @property
    def uses_examples(self) -> bool:
        return EXAMPLES in self.variables

    @property
    def uses_input(self) -> bool:
        return INPUT in self.variables

    def render(self, variables: dict[str, Any]) -> str:
        try:
            return self._template.render(**variables)
        except jinja2.UndefinedError as e:
            given = sorted(self.variables & set(variables))
            raise PromptTemplateError(
                f"{self.name}: {e.message} (set variables with --var NAME=VALUE and the question with "
                f"--input TEXT; given: {', '.join(given) or 'none'})"
            ) from None
        except (jinja2.TemplateError, SecurityError) as e:
            raise PromptTemplateError(f"{self.name}: {e}") from None


@dataclass(frozen=True)
class Turns:
    """A prompt before it meets a model: the instruction and what follows it."""

    instruction: str
    examples: list[Example]  # shown as turns after the instruction (empty if the template lays them out)
    input: str | None  # the last input turn, if the template does not place the input itself

    @property
    def followed(self) -> bool:
        return bool(self.examples) or self.input is not None


def prompt_turns(
    template: PromptTemplate, variables: dict[str, Any], examples: list[Example], input: str | None = None
) -> Turns:
    """Render the template and say which examples and input follow it as turns (see the module doc)."""
    reserved = {EXAMPLES, INPUT} & set(variables)
    if reserved:
        raise PromptTemplateError(f"{template.name}: {sorted(reserved)[0]!r} is set by the prompt itself, not by --var")
    if examples and not template.uses_examples:
        if template.uses_input:
            raise PromptTemplateError(
                f"{template.name} places `input` but not `examples`, so the examples would come after the "
                "question: lay them out in the template (`examples`), or leave `input` out of it so that "
                "it follows the examples as the last turn"
            )
        if input is None:
            raise PromptTemplateError(
                f"{template.name} does not lay out `examples`, so they follow it as turns and the question "
                "must come last: give it (--input TEXT)"
            )
    context = {**variables, EXAMPLES: examples}
    if input is not None:
        context[INPUT] = input
    instruction = template.render(context)
    return Turns(
        instruction,
        [] if template.uses_examples else list(examples),
        None if template.uses_input else input,
    )


def chat_messages(turns: Turns) -> list[dict[str, str]]:
    if not turns.followed:
        return [{"role": "user", "content": turns.instruction}]
    messages = [{"role": "system", "content": turns.instruction}] if turns.instruction.strip() else []
    for example in turns.examples:
        messages += [{"role": "user", "content": example.input}, {"role": "assistant", "content": example.output}]
    if turns.input is not None:
        messages.append({"role": "user", "content": turns.input})
    return messages


def completion_text(turns: Turns) -> str:
    blocks = [turns.instruction] if turns.instruction.strip() else []
    blocks += [f"{INPUT_LABEL} {e.input}\n{OUTPUT_LABEL} {e.output}" for e in turns.examples]
    if turns.input is not None:
        blocks.append(f"{INPUT_LABEL} {turns.input}\n{OUTPUT_LABEL}")
    return "\n\n".join(blocks) if turns.followed else turns.instruction


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # exactly what the model reads (for a chat model, after its chat template)
    messages: list[dict[str, str]] | None  # the chat turns; None for a completion prompt
    token_ids: list[int]  # what the model is given
    window: int  # the model's context length
    shots: int  # examples in the prompt
    stop: tuple[str, ...]  # where an answer ends when turns are laid out as text ("\nInput:")

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


def render_prompt(
    model: Any,
    template: PromptTemplate,
    variables: dict[str, Any],
    examples: list[Example],
    input: str | None = None,
    chat: bool | None = None,
    max_new_tokens: int | None = None,
) -> RenderedPrompt:
    """The prompt for `model`: chat turns when the model has a chat template (chat=None) or
    chat=True, plain text otherwise. The prompt plus max_new_tokens (default: the model's) must
    fit the context window, or a ContextLengthError says how many of the examples would fit."""
    if model.config.family == "encoder":
        raise UnsupportedModelError(f"{model.source.name} is an encoder-only model: prompts need a model that writes text")
    has_template = model.tokenizer.chat_template is not None
    if chat and not has_template:
        raise UnsupportedModelError(f"{model.source.name} has no chat template: render the prompt as text")
    chat = has_template if chat is None else chat
    return fitted_prompt(
        lambda k: layout_prompt(model, template, variables, examples[:k], input, chat),
        len(examples), new_token_budget(model, max_new_tokens), "examples", "--shots",
    )  # fmt: skip


def fitted_prompt(
    layout: Callable[[int], RenderedPrompt], count: int, new_tokens: int, items: str, flag: str, least: int = 0
) -> RenderedPrompt:
    """layout(count), the prompt with all `count` of its items (few-shot examples, retrieved
    passages), when it fits the context window beside new_tokens; else a ContextLengthError that
    says how many of them would fit (and the flag that asks for that many, at least `least`)."""
    prompt = layout(count)
    room = prompt.window - new_tokens
    if prompt.token_count <= room:
        return prompt
    fitting = largest_fitting(count, lambda k: layout(k).token_count <= room)
    shorten = "shorten the template or the input, or ask for fewer new tokens"
    if fitting is None:
        advice = f"even with no {items} it does not fit: {shorten}"
    elif fitting < least:
        advice = f"not even {least} of the {items} fits: {shorten}"
    else:
        advice = f"at most {fitting} of the {items} fit ({flag} {fitting})"
    raise ContextLengthError(
        f"the prompt with {count} {items} is {prompt.token_count} tokens; with {new_tokens} new tokens "
        f"it needs {prompt.token_count + new_tokens} of the model's context window of {prompt.window}: {advice}"
    )


def layout_prompt(
    model: Any, template: PromptTemplate, variables: dict[str, Any], examples: list[Example], input: str | None, chat: bool
) -> RenderedPrompt:
    """render_prompt without the context-window check (for callers that check their own way).

    Text the caller passed in (variable values, examples, the input) is always encoded as text:
    special-token text in it never becomes a control token (the tokenizer's encode_chat and
    encode_rendered); the template's own text is encoded with special tokens recognised."""
    data = {"variables": variables, "examples": [asdict(e) for e in examples], "input": input}

    def turns_of(data: dict[str, Any]) -> Turns:
        return prompt_turns(template, data["variables"], [Example(**e) for e in data["examples"]], data["input"])

    turns = turns_of(data)
    if chat:
        messages: list[dict[str, str]] | None = chat_messages(turns)
        text, ids = model.chat_prompt(messages), model.encode_chat(messages)
        stop: tuple[str, ...] = ()
    else:
        messages = None
        text = completion_text(turns)
        ids = model.tokenizer.encode_rendered(lambda marked: completion_text(turns_of(marked)), data)
        stop = ("\n" + INPUT_LABEL,) if turns.followed else ()
    return RenderedPrompt(text, messages, ids, model.config.context_length, len(examples), stop)


def new_token_budget(model: Any, max_new_tokens: int | None) -> int:
    return max_new_tokens or model.generation_defaults.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS


def largest_fitting(count: int, fits: Callable[[int], bool]) -> int | None:
    """The largest k <= count with fits(k), for a prompt that grows with k (a binary search), or
    None when not even fits(0); fits(count) is known to be False."""
    if not fits(0):
        return None
    low, high = 0, count - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def complete(model: Any, prompt: RenderedPrompt, **kwargs: Any) -> Any:
    """Generate from a rendered prompt's token ids, ending where an answer laid out as text ends."""
    return model.generate(prompt.token_ids, **with_prompt_stops(prompt, kwargs))


def with_prompt_stops(prompt: RenderedPrompt, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Generation keyword arguments with the prompt's own stop strings added to any given."""
    stops = kwargs.get("stop")
    stops = [stops] if isinstance(stops, str) else list(stops or [])
    return {**kwargs, "stop": stops + list(prompt.stop)}
