"""response_format on /v1/chat/completions, through the official openai client: json_schema (also
as the client's `parse` with a Pydantic model, unchanged), json_object, the length limit, bad
schemas as 400s, and constrained and free requests sharing the server's batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from conftest import copy_model, with_generation_config
from test_server import LiveServer, live
from test_structured import SCHEMAS

import attendo


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: str = Field(pattern="^(cat|dog|bird)$")
    age: int = Field(ge=0, le=30)


def long_context(tiny_llama_dir: Path, directory: Path, window: int = 512, **generation: object) -> Path:
    """A copy of the tiny LLaMA with a longer window (RoPE has no table that length would
    change), so a chat prompt leaves room for a whole JSON answer."""
    copy = copy_model(tiny_llama_dir, directory)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": window}))
    return with_generation_config(copy, **generation) if generation else copy


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory) -> Iterator[LiveServer]:
    model = attendo.load(long_context(tiny_llama_dir, tmp_path_factory.mktemp("long") / "m"))
    yield from live({"tiny": model}, max_batch=8)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


ASK = [{"role": "user", "content": "A pet, as JSON please."}]


def test_parse_with_a_pydantic_model_works_unchanged(client):
    for parse in (client.beta.chat.completions.parse, client.chat.completions.parse):
        completion = parse(model="tiny", messages=ASK, response_format=Pet, max_tokens=100, n=4, seed=5)
        for choice in completion.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Pet)
            jsonschema.validate(json.loads(choice.message.content), Pet.model_json_schema())


@pytest.mark.parametrize("name", ["nested", "array-enum", "bounded-numbers"])
def test_json_schema_response_format_validates(client, name):
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMAS[name], "strict": True}}
    completion = client.chat.completions.create(
        model="tiny", messages=ASK, response_format=response_format, max_tokens=110, n=3, seed=1
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_and_streaming(client, server):
    kwargs = {"model": "tiny", "messages": ASK, "response_format": {"type": "json_object"}, "max_tokens": 110,
              "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":  # a random network may nest past any limit
        assert isinstance(json.loads(streamed), dict)
    assert streamed.startswith("{")


def test_too_few_tokens_is_length_and_parse_says_so(client):
    completion = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=4, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Pet.model_json_schema()}}
    )
    assert completion.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.beta.chat.completions.parse(model="tiny", messages=ASK, response_format=Pet, max_tokens=4)


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid type: foo"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 3, "maxLength": 1}}}, "Unsatisfiable"),
        ({"type": "json_schema"}, "needs a json_schema"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_bad_response_formats_are_400s(server, response_format, message):
    answer = server.post("/v1/chat/completions", {"model": "tiny", "messages": ASK, "response_format": response_format})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and error["param"].startswith("response_format")


def test_constrained_and_free_requests_share_the_batch(client, server):
    free = {"model": "tiny", "messages": ASK, "max_tokens": 20, "temperature": 0}
    alone = client.chat.completions.create(**free).choices[0].message.content
    constrained = {**free, "max_tokens": 100, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["nested"]}}}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.chat.completions.create, **(constrained if i % 2 else free)) for i in range(8)]
        answers = [f.result().choices[0].message.content for f in futures]
    for i, answer in enumerate(answers):
        if i % 2:
            jsonschema.validate(json.loads(answer), SCHEMAS["nested"])
        else:
            assert answer == alone
