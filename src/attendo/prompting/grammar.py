"""Structured output: the token mask of the sampler's "grammar" stage.

A `Grammar` is what an output must match: a JSON Schema, any JSON object, a regular expression or
a Lark grammar, compiled by llguidance against the model's own tokenizer. Each sequence that uses
it keeps a `GrammarState` (the generation loop holds one per sequence); before every token the
state gives the mask of the tokens that keep the output inside the grammar (end-of-sequence only
where the output is complete), the sampler drops the others, and the chosen token advances the
state. When the grammar admits nothing more, the sequence ends.

llguidance parses lazily (an Earley parser over a lexer built on the fly), so a grammar is ready
in about a millisecond whatever its size, and a mask over SmolLM2's 49k tokens costs 0.04 to
0.6 ms (benchmarks/bench_structured.py), against 13-22 ms for a decode step.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
import torch

from attendo.errors import InvalidSettingError
from attendo.tokenizer import TextTokenizer

# JSON as models write it on one line ({"a": 1, "b": [2, 3]}), with no room for runs of whitespace
# a model could loop in.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InvalidSettingError):
    """A schema, regular expression or grammar that cannot constrain generation."""


def schema_of(json_schema: Any) -> dict[str, Any]:
    """A JSON Schema as a dict, from a dict, JSON text, or a pydantic model class.

    A pydantic class means exactly its fields (it ignores any others when it reads JSON), so its
    objects get additionalProperties false, as OpenAI's strict schemas have; a dict is taken as
    written, where JSON Schema lets an object carry properties it does not name."""
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        return _closed(json_schema.model_json_schema())
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except ValueError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(json_schema, dict):
        raise GrammarError(f"json_schema must be an object (a dict or a pydantic model class), got {type(json_schema).__name__}")
    return json_schema


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
_VALUES = ("enum", "const", "default", "examples")  # JSON values, not schemas


def _closed(schema: Any) -> Any:
    """Every object schema that names its properties and says nothing of others allows none."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in _VALUES:
            closed[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: _closed(sub) for name, sub in value.items()}
        else:
            closed[key] = _closed(value)
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _one_line(message: str) -> str:
    """llguidance's messages may span lines (a caret under the regex) and point into the grammar
    it wraps a regex in: keep what says the problem."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    detail = [line.removeprefix("error: ") for line in lines[1:] if line.startswith("error:")]
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0] if lines else "rejected").replace(" (in regex)", "")
    return " ".join([first, *detail])


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self._matcher = llguidance.LLMatcher(grammar.vocabulary.tokenizer, grammar.source, log_level=0)
        self._words = torch.empty(grammar.vocabulary.words, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool (logits width,): the tokens that keep the output inside the grammar."""
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        return self.grammar.vocabulary.unpack(self._words)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} it had allowed: {self._matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still go on)."""
        return self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The grammar admits nothing more: the output is complete."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled constraint, shared by every sequence that uses it (each has its own state)."""

    def __init__(self, vocabulary: Vocabulary, source: str, description: str) -> None:
        self.vocabulary = vocabulary
        self.source = source  # llguidance's grammar, JSON text
        self.description = description

    def start(self) -> GrammarState:
        return GrammarState(self)

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class Vocabulary:
    """The model's tokens as llguidance sees them, and the way from its bit masks to ours.

    `width` is the model's logits width, which may exceed the tokenizer's vocabulary (rows padded
    for speed): llguidance is told the full width and never allows a padding id. A model without
    an end-of-sequence token still needs one for llguidance; a special token (or, with none, the
    last id) stands in for it and is masked out, so such a model ends only when the grammar is
    finished or at the length limit.
    """

    def __init__(self, tokenizer: TextTokenizer, width: int, eos_ids: list[int]) -> None:
        stand_in: list[int] = []
        if not eos_ids:
            specials = [i for i in map(tokenizer.token_to_id, tokenizer.special_texts) if i is not None]
            stand_in = [min(specials)] if specials else [width - 1]
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=width, eos_token=eos_ids or stand_in)
        self.width = width
        self.words = (width + 31) // 32
        self._stand_in = stand_in
        self._shifts = torch.arange(32, dtype=torch.int32)

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """int32 (words,) of 32 token bits each, lowest bit first -> bool (width,)."""
        allowed = ((words[:, None] >> self._shifts) & 1).bool().flatten()[: self.width]
        if self._stand_in:
            allowed[self._stand_in] = False
        return allowed

    def compile(self, source: str, description: str) -> Grammar:
        """Check a grammar against this vocabulary; a clear GrammarError if it cannot be used."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer)
        if is_error:
            raise GrammarError(f"{description}: {_one_line(messages[0])}")
        grammar = Grammar(self, source, description)
        first = grammar.start()
        if not first.allowed().any() and not first.accepting:
            raise GrammarError(f"{description}: nothing can match it")
        return grammar

    def json_schema(self, json_schema: Any) -> Grammar:
        schema = schema_of(json_schema)
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        except ValueError as e:
            raise GrammarError(f"json_schema: {_one_line(str(e))}") from None
        return self.compile(source, "json_schema")

    def json_object(self) -> Grammar:
        """Any JSON object."""
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return self.compile(llguidance.LLMatcher.grammar_from_regex(pattern), f"regex {pattern!r}")

    def lark(self, text: str) -> Grammar:
        return self.compile(llguidance.LLMatcher.grammar_from_lark(text), "grammar")
