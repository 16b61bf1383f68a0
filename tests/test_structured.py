"""Structured output: every finished output parses and validates.

The hardest case is random logits, where the grammar has to do all the work: each schema and
regex is sampled many times from pure noise through the sampler's grammar stage, from tiny random
models (byte-level BPE and SentencePiece-style vocabularies, a logits width wider than the
vocabulary), and from the bundled SmolLM2. `jsonschema` and `re.fullmatch` are the judges.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import BOS, copy_model, with_generation_config

import attendo
from attendo.cli import main
from attendo.generation.loop import Batch, Request
from attendo.generation.sampler import SamplingSettings, make_generator, next_token, sampling_stages
from attendo.prompting.grammar import GrammarError, Vocabulary

# Bounded schemas: every path through them ends, so random sampling always finishes.
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array-enum": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", 7, None]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 65},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "ok": {"type": "boolean"},
        },
        "required": ["age", "score", "ok"],
        "additionalProperties": False,
    },
    "pattern-optional": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "note": {"type": "string", "maxLength": 4},
        },
        "required": ["code"],
        "additionalProperties": False,
    },
    "top-level-array": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 4},
}
# [0-9], not \d: llguidance's \d is Unicode-aware, and so is Python's, but their Unicode versions differ.
REGEXES = [r"[0-9]{3}-[0-9]{4}", "(yes|no|maybe)", r"[A-Z][a-z]{2,5}( [A-Z][a-z]{2,5}){0,2}", r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}"]
SAMPLE = SamplingSettings(do_sample=True)


def sample_from_noise(vocabulary: Vocabulary, grammar, seed: int, eos: int | None, limit: int = 200) -> list[int]:
    """Tokens drawn from random logits through the sampler's grammar stage until the grammar ends."""
    state, generator, tokens = grammar.start(), make_generator(seed), []
    for _ in range(limit):
        logits = torch.randn(vocabulary.width, generator=generator) * 4
        token = int(next_token(logits, SAMPLE, None, generator, state.allowed()))
        if token == eos:
            assert state.accepting
            return tokens
        tokens.append(token)
        state.advance(token)
        if state.finished:
            return tokens
    raise AssertionError(f"no end after {limit} tokens: {tokens}")


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> attendo.Model:
    return attendo.load(smollm2_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_random_logits_always_give_valid_json_bundled_vocabulary(smollm2, name):
    vocabulary = Vocabulary(smollm2.tokenizer, smollm2.config.vocab_size, smollm2.eos_token_ids)
    grammar = vocabulary.json_schema(SCHEMAS[name])
    for seed in range(8):
        text = smollm2.tokenizer.decode(sample_from_noise(vocabulary, grammar, seed, smollm2.eos_token_ids[0]))
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.slow
@pytest.mark.parametrize("pattern", REGEXES)
def test_random_logits_always_match_the_regex(smollm2, pattern):
    vocabulary = Vocabulary(smollm2.tokenizer, smollm2.config.vocab_size, smollm2.eos_token_ids)
    grammar = vocabulary.regex(pattern)
    for seed in range(8):
        text = smollm2.tokenizer.decode(sample_from_noise(vocabulary, grammar, seed, smollm2.eos_token_ids[0]))
        assert re.fullmatch(pattern, text), text


def test_padding_rows_of_a_wider_logits_width_are_never_allowed(tiny_llama):
    width = tiny_llama.tokenizer.vocab_size + 29
    vocabulary = Vocabulary(tiny_llama.tokenizer, width, [])
    state = vocabulary.json_object().start()
    allowed = state.allowed()
    assert allowed.shape == (width,) and allowed.any() and not allowed[tiny_llama.tokenizer.vocab_size :].any()
    logits = torch.zeros(width)
    logits[tiny_llama.tokenizer.vocab_size :] = 100.0  # the padding rows are what the model likes best
    assert int(next_token(logits, SamplingSettings(), None, None, allowed)) < tiny_llama.tokenizer.vocab_size
    # a model without an end-of-sequence token: the stand-in llguidance needs is never allowed
    assert not allowed[tiny_llama.tokenizer.token_to_id(BOS)]


def test_tiny_model_batch_of_prompts_every_schema(tiny_llama):
    """A random network, sampled: eight prompts share a batch, each with its own grammar state."""
    prompts = ["Hello", "The quick", "def add(", "Paris is", "naïve café", "for i in", "Numbers 0", "world!"]
    texts = set()
    for name, schema in SCHEMAS.items():
        results = tiny_llama.generate(prompts, json_schema=schema, max_new_tokens=100, do_sample=True, seed=3)
        for result in results:
            assert result.finish_reason == "stop", (name, result.text)
            jsonschema.validate(json.loads(result.text), schema)
        texts |= {r.text for r in results}
    assert len(texts) > 2 * len(SCHEMAS)  # really sampled: not one fixed answer per schema


def test_tiny_model_regex_and_end_of_sequence(tiny_llama_dir, tmp_path):
    """With an end-of-sequence token the model may stop only where the text is a complete match."""
    directory = with_generation_config(copy_model(tiny_llama_dir, tmp_path / "m"), eos_token_id=0)
    model = attendo.load(directory)
    for pattern in REGEXES + [r"[0-9]+"]:
        for seed in range(4):
            result = model.generate(f"Seed {seed}:", regex=pattern, max_new_tokens=60, do_sample=True, seed=seed)
            assert result.finish_reason == "stop" and re.fullmatch(pattern, result.text), (pattern, result.text)


def test_sentencepiece_vocabulary_with_byte_fallback(tmp_path):
    """A SentencePiece-style vocabulary ("▁" for spaces, <0x7B> bytes for "{"), through the GGUF loader."""
    from test_gguf_reader import hf_llama, sentencepiece_vocab, write_gguf

    vocab = sentencepiece_vocab()
    model = attendo.load(write_gguf(tmp_path / "spm.gguf", hf_llama(len(vocab["tokenizer.ggml.tokens"])), tokenizer=vocab))
    assert "▁" in "".join(vocab["tokenizer.ggml.tokens"]) and "<0x7B>" in vocab["tokenizer.ggml.tokens"]
    for name in ("nested", "pattern-optional"):
        for result in model.generate(["The quick", "Hello world"], json_schema=SCHEMAS[name], max_new_tokens=90, do_sample=True, seed=1):
            assert result.finish_reason == "stop", result.text
            jsonschema.validate(json.loads(result.text), SCHEMAS[name])
    spaced = model.generate("Hello", regex=r"[a-z]{2,4}( [a-z]{2,4}){1,3}", max_new_tokens=40, do_sample=True, seed=0)
    assert re.fullmatch(r"[a-z]{2,4}( [a-z]{2,4}){1,3}", spaced.text), spaced.text


def test_constrained_and_free_requests_share_a_batch(tiny_llama):
    schema = SCHEMAS["array-enum"]
    greedy = SamplingSettings()
    prompt = tiny_llama.tokenizer.encode("Hello")
    grammar = tiny_llama.grammar(json_schema=schema)
    batch = Batch(tiny_llama.network, tiny_llama.tokenizer, [], slots=3, max_len=100)
    free = batch.add(Request(prompt, greedy, 12))
    constrained = batch.add(Request(prompt, greedy, 60, grammar=grammar))
    other = batch.add(Request(tiny_llama.tokenizer.encode("Paris"), SAMPLE, 60, grammar=grammar))
    while batch.busy:
        batch.step()
    assert free.result().text == tiny_llama.generate("Hello", max_new_tokens=12, do_sample=False).text
    assert constrained.result().text == tiny_llama.generate("Hello", json_schema=schema, max_new_tokens=60, do_sample=False).text
    for sequence in (constrained, other):
        assert sequence.finish_reason == "stop"
        jsonschema.validate(json.loads(sequence.result().text), schema)


def test_the_grammar_stage_is_shown_among_the_sampling_stages(tiny_llama):
    state = tiny_llama.grammar(regex="(yes|no)").start()
    logits = tiny_llama.logits([tiny_llama.tokenizer.encode("Hello")])[0, -1]
    stages = dict(sampling_stages(logits, SamplingSettings(do_sample=True, top_k=5), None, state.allowed()))
    kept = {tiny_llama.tokenizer.token_text(int(i)) for i in torch.nonzero(stages["grammar"] > -torch.inf)}
    assert kept and all("yes".startswith(t) or "no".startswith(t) for t in kept)


@pytest.mark.slow
def test_bundled_model_answers_in_json_pydantic_class(smollm2):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)
        population_millions: float = Field(ge=0, le=50)

    messages = [{"role": "user", "content": "Describe Paris as JSON with name, country and population_millions."}]
    for settings in ({"do_sample": False}, {"temperature": 0.8, "seed": 1}):
        result = smollm2.chat(messages, json_schema=City, max_new_tokens=60, **settings)
        assert result.finish_reason == "stop", result.text
        City.model_validate_json(result.text)
        jsonschema.validate(json.loads(result.text), City.model_json_schema())


def test_too_few_tokens_is_length_and_a_clear_cli_error(tiny_llama, tiny_llama_dir, tmp_path, capsys):
    result = tiny_llama.generate("Hello", json_schema=SCHEMAS["nested"], max_new_tokens=3, do_sample=False)
    assert result.finish_reason == "length" and len(result.token_ids) == 3
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["nested"]))
    assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "--json-schema", str(schema_file), "-n", "3", "--greedy"]) == 2
    out, err = capsys.readouterr()
    assert out == result.text + "\n"
    assert err.startswith("attendo: error: the output was cut off after 3 tokens") and err.count("\n") == 1


def test_chat_command_constrains_every_reply(tiny_llama_dir, capsys, monkeypatch):
    lines = iter(["Is the sky blue?", "And grass?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(tiny_llama_dir), "--regex", "(yes|no)", "-n", "5", "--seed", "1"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2 and all(r in ("assistant> yes", "assistant> no") for r in replies), replies


def test_cli_json_schema_and_regex(tiny_llama, tiny_llama_dir, tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["bounded-numbers"]))
    assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "--json-schema", str(schema_file), "-n", "80", "--seed", "4"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS["bounded-numbers"])
    assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "--chat", "--regex", "(yes|no)", "-n", "5"]) == 0
    assert capsys.readouterr().out in ("yes\n", "no\n")


@pytest.mark.parametrize(
    "kind, value, message",
    [
        ("json_schema", {"type": "foo"}, "json_schema: Invalid type: foo"),
        ("json_schema", {"type": "integer", "minimum": 5, "maximum": 2}, "json_schema: Unsatisfiable schema"),
        ("json_schema", {"$ref": "#/nowhere"}, "json_schema: Pointer '/nowhere' does not exist"),
        ("json_schema", "{not json", "json_schema is not valid JSON"),
        ("regex", "a[", "regex 'a[': invalid regex"),
        ("regex", r"[^\s\S]", r"regex '[^\\s\\S]': nothing can match it"),
    ],
)
def test_bad_schemas_and_regexes_are_one_line_errors(tiny_llama, kind, value, message):
    with pytest.raises(GrammarError) as error:
        tiny_llama.generate("Hello", max_new_tokens=5, **{kind: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_input_on_the_command_line(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"type": "foo"}')
    for extra in (["--json-schema", str(tmp_path / "bad.json")], ["--json-schema", str(tmp_path / "missing.json")],
                  ["--regex", "a["], ["--regex", "a", "--json-schema", "object"], ["--regex", "a", "--num-beams", "2"]):  # fmt: skip
        assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "-n", "5", *extra]) == 2, extra
        out, err = capsys.readouterr()
        assert err.startswith("attendo: error: ") and err.count("\n") == 1, err
