"""The inspection API against the Python API, on a live server serving the tiny LLaMA, a tiny BART
and the bundled MiniLM: token ids in generations (streamed and not), readable token strings,
/v1/inspect/stages (its final distribution is what the sampler draws from; a second request for
the same context reuses the logits), /v1/inspect/attention (equal to model.attention_maps; 413
past the limit), /v1/inspect/embeddings, /v1/inspect/model, the 4xx shapes, and that inspecting
while a generation streams leaves that generation as it would be alone."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from test_server import SlowNetwork, live, sse_events
from test_seq2seq import _bart
from tiny_families import SENTENCES

import attendo
from attendo.generation.sampler import process_logits
from attendo.inspect.attention import MAX_ATTENTION_TOKENS
from attendo.inspect.geometry import geometry
from attendo.inspect.tokens import readable_tokens
from attendo.model import Model

transformers = pytest.importorskip("transformers")
EMOJI_PROMPT = "naïve café, smörgåsbord; 世界 and こんにちは; 😀 👍"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> Model:
    return attendo.load(tiny_llama_dir)


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return _bart(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def minilm() -> Model:
    return attendo.load("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, bart_dir, minilm):
    models = {"tiny": attendo.load(tiny_llama_dir), "bart": attendo.load(bart_dir), "minilm": minilm}
    yield from live(models, max_batch=4, max_queue=8)


def post(server, path: str, body: dict) -> dict:
    response = server.post(path, body)
    assert response.status_code == 200, response.text
    return response.json()


# --- token ids in generations -----------------------------------------------------------------


def test_completion_returns_token_ids_and_readable_tokens(server, tiny):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    answer = post(server, "/v1/completions", body)
    expected = tiny.generate("Hello", max_new_tokens=8, do_sample=False)
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == expected.prompt_token_ids == tiny.tokenizer.encode("Hello")
    assert choice["token_ids"] == expected.token_ids
    assert choice["tokens"] == readable_tokens(tiny.tokenizer, expected.token_ids)
    plain = post(server, "/v1/completions", {**body, "return_token_ids": False})
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_token_ids_each_come_once_with_their_text(server, tiny, route):
    """Multi-byte characters and a stop string make the stream hold text back: the ids of those
    tokens ride with a later chunk, and every id comes exactly once."""
    chat = route.endswith("chat/completions")
    prompt = {"messages": [{"role": "user", "content": EMOJI_PROMPT}]} if chat else {"prompt": EMOJI_PROMPT}
    for seed in range(3):
        body = {"model": "tiny", **prompt, "max_tokens": 24, "temperature": 1.5, "seed": seed, "return_token_ids": True}
        whole = post(server, route, body)
        chunks = [json.loads(e) for e in sse_events(server.post(route, {**body, "stream": True}))[:-1]]
        assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in chunks[1:])
        streamed = [i for c in chunks for ch in c["choices"] for i in ch["token_ids"]]
        labels = [t for c in chunks for ch in c["choices"] for t in ch["tokens"]]
        assert streamed == whole["choices"][0]["token_ids"]
        assert labels == whole["choices"][0]["tokens"] == readable_tokens(tiny.tokenizer, streamed)
        if not chat:
            assert streamed == tiny.generate(EMOJI_PROMPT, max_new_tokens=24, temperature=1.5, seed=seed).token_ids


def test_tokenize_shows_byte_pieces_readably(server, tiny):
    answer = post(server, "/tokenize", {"model": "tiny", "prompt": "😀", "return_token_strs": True})
    assert len(answer["tokens"]) > 1  # the test tokenizer splits the emoji into bytes
    assert all("\ufffd" not in t for t in answer["token_strs"])
    assert "".join(answer["token_strs"]) == "<0xF0><0x9F><0x98><0x80>"


# --- stages -----------------------------------------------------------------------------------


def test_stages_final_distribution_is_what_the_sampler_draws_from(server, tiny):
    ids = tiny.tokenizer.encode("The quick brown fox")
    settings = {"temperature": 0.7, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.3, "seed": 5}
    first = post(server, "/v1/inspect/stages", {"model": "tiny", "token_ids": ids, "settings": settings, "top": 200})
    assert [s["name"] for s in first["stages"]] == ["raw", "penalties", "temperature", "top_k", "top_p", "min_p", "final"]
    assert first["vocab_size"] == tiny.config.vocab_size and first["reused_logits"] is False
    logits = tiny.logits([ids])[0, -1]
    sampling = tiny.sampling_settings(**settings)
    expected = process_logits(logits, sampling, torch.tensor(ids)).double().softmax(-1)
    final = first["stages"][-1]
    assert final["kept"] == int((expected > 0).sum()) and len(final["tokens"]) == final["kept"]
    for token in final["tokens"]:
        assert token["p"] == pytest.approx(float(expected[token["id"]]), abs=1e-5)
    generated = tiny.generate("The quick brown fox", max_new_tokens=1, **settings).token_ids[0]
    assert first["chosen"]["id"] == generated
    again = post(server, "/v1/inspect/stages", {"model": "tiny", "token_ids": ids, "settings": settings, "top": 200})
    assert again["reused_logits"] is True and again["stages"] == first["stages"]


def test_stages_with_nothing_set_is_greedy_and_marks_a_given_token(server, tiny):
    ids = tiny.tokenizer.encode("Hello world")
    greedy = post(server, "/v1/inspect/stages", {"model": "tiny", "token_ids": ids})
    argmax = int(tiny.logits([ids])[0, -1].argmax())
    assert greedy["chosen"]["id"] == argmax and greedy["chosen"]["p"] == 1.0
    assert all(s["mass"] == 1.0 and s["threshold"] is None for s in greedy["stages"][:-1])
    assert greedy["stages"][-1]["kept"] == 1
    other = next(t["id"] for t in greedy["stages"][0]["tokens"] if t["id"] != argmax)
    marked = post(server, "/v1/inspect/stages", {"model": "tiny", "token_ids": ids, "chosen": other, "top": 1})
    final = marked["stages"][-1]
    assert marked["chosen"] == {"id": other, "token": readable_tokens(tiny.tokenizer, [other])[0], "p": 0.0}
    assert [t["id"] for t in final["tokens"]] == [argmax, other]  # the top one, then the chosen one
    sampled = post(server, "/v1/inspect/stages", {"model": "tiny", "token_ids": ids, "settings": {"top_k": 5}})
    assert sampled["chosen"] is None and sampled["stages"][-1]["kept"] == 5  # sampling, no seed: no draw


def test_stages_of_an_encoder_decoder_start_its_decoder(server, bart_dir):
    bart = attendo.load(bart_dir)
    ids = bart.tokenizer.encode(SENTENCES[0])
    answer = post(server, "/v1/inspect/stages", {"model": "bart", "token_ids": ids})
    assert answer["chosen"]["id"] == bart.generate(SENTENCES[0], max_new_tokens=1, do_sample=False).token_ids[0]
