"""Retrieval through the server: POST /v1/retrieve and retrieval-augmented chat at
/v1/indexes/{name}/chat/completions, driven by the official openai client where it can be.

Answers are compared with the Python API on the same index and model (greedy): the passages with
Index.search, the chat with Model.chat on the augmented question.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from conftest import copy_model
from fastapi.testclient import TestClient

import attendo
from attendo.retrieval.answer import augmented_question
from attendo.retrieval.index import Index
from attendo.server import ServerSettings, create_app

DOCUMENTS = {
    "lora.md": "LoRA trains small low-rank matrices beside frozen weights.",
    "quant.md": "Quantization stores weights in 4 or 8 bits.",
    "attention.md": "Self-attention lets every token weigh every other token.",
}


@pytest.fixture(scope="module")
def long_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny LLaMA with a 1024-position window (RoPE has no table to outgrow), so a prompt with
    passages fits."""
    directory = copy_model(tiny_llama_dir, tmp_path_factory.mktemp("long") / "llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return attendo.load(directory)


@pytest.fixture(scope="module")
def index_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text)
    db = folder.parent / "notes.db"
    with Index.open(db, create=True) as index:
        index.update(folder)
    return db


@pytest.fixture(scope="module")
def client(long_llama, index_file):
    app = create_app(ServerSettings(models=[], api_key="sekrit", indexes={"notes": str(index_file)}), models={"tiny": long_llama})
    with TestClient(app, headers={"Authorization": "Bearer sekrit"}) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield client


def test_retrieve_gives_what_the_python_api_gives(client, index_file):
    answer = client.post("/v1/retrieve", json={"index": "notes", "query": "What does LoRA train?", "top_k": 2})
    assert answer.status_code == 200
    body = answer.json()
    with Index.open(index_file) as index:
        expected = index.search("What does LoRA train?", top_k=2)
    assert body["object"] == "retrieval" and body["query"] == "What does LoRA train?"
    assert body["passages"] == [p.as_dict() for p in expected]
    assert body["passages"][0]["source"].endswith("lora.md")


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"index": "other", "query": "x"}, 404, "index"),
        ({"index": "notes", "query": ""}, 400, "query"),
        ({"index": "notes", "query": "x", "top_k": 0}, 400, "top_k"),
        ({"index": "notes", "query": "x", "mode": "fuzzy"}, 400, "mode"),
        ({"query": "x"}, 400, "index"),
    ],
    ids=["unknown-index", "empty-query", "zero-top-k", "unknown-mode", "no-index"],
)
def test_retrieve_mistakes_are_openai_errors(client, body, status, param):
    answer = client.post("/v1/retrieve", json=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] in ("invalid_request_error", "not_found")


def test_retrieve_needs_the_api_key(client):
    assert client.post("/v1/retrieve", json={"index": "notes", "query": "x"}, headers={"Authorization": "Bearer no"}).status_code == 401


def test_augmented_chat_with_the_openai_client(client, long_llama, index_file):
    ai = openai.OpenAI(base_url="http://testserver/v1/indexes/notes", api_key="sekrit", http_client=client)
    messages = [{"role": "user", "content": "How are weights stored small?"}]
    reply = ai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"retrieval": {"top_k": 2}})  # fmt: skip
    with Index.open(index_file) as index:
        passages = index.search("How are weights stored small?", top_k=2)
    augmented = [{"role": "user", "content": augmented_question("How are weights stored small?", passages)}]
    assert reply.choices[0].message.content == long_llama.chat(augmented, max_new_tokens=6, do_sample=False).text
    assert [p["source"] for p in reply.model_extra["passages"]] == [p.source for p in passages]
    streamed = ai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                          extra_body={"retrieval": {"top_k": 2}})  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_augmented_chat_needs_a_question(client):
    answer = client.post("/v1/indexes/notes/chat/completions",
                         json={"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}]})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"
    answer = client.post("/v1/indexes/nope/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "index_not_found"
