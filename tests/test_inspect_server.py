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


# --- attention, embeddings, model -------------------------------------------------------------


def test_attention_equals_the_models_maps(server, tiny):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tiny.tokenizer.encode(text)
    expected = tiny.attention_maps([ids])[1, 0]  # layer 1: (heads, queries, keys)
    answer = post(server, "/v1/inspect/attention", {"model": "tiny", "text": text, "layer": 1})
    assert (answer["family"], answer["layers"], answer["heads"], answer["layer"]) == ("decoder", 2, 4, 1)
    assert [t["id"] for t in answer["tokens"]] == ids
    assert [t["token"] for t in answer["tokens"]] == readable_tokens(tiny.tokenizer, ids)
    kind = answer["kinds"]["self"]
    assert list(answer["kinds"]) == ["self"] and (kind["queries"], kind["keys"]) == ("tokens", "tokens")
    assert torch.tensor(kind["heads"]).sub(expected).abs().max() <= 5e-5  # rounded to 4 decimals
    assert torch.tensor(kind["average"]).sub(expected.mean(0)).abs().max() <= 5e-5
    by_ids = post(server, "/v1/inspect/attention", {"model": "tiny", "token_ids": ids, "layer": -1})
    assert by_ids["layer"] == 1 and by_ids["kinds"] == answer["kinds"]


def test_attention_of_an_encoder_decoder_and_an_encoder(server, bart_dir, minilm):
    bart = attendo.load(bart_dir)
    source, target = SENTENCES[0], "the dog"
    answer = post(server, "/v1/inspect/attention", {"model": "bart", "text": source, "target": target, "layer": 1})
    ids = bart.tokenizer.encode(source)
    target_ids = [bart.decoder_start_token_id, *bart.tokenizer.encode(target, add_special_tokens=False)]
    assert [t["id"] for t in answer["target_tokens"]] == target_ids and answer["layers"] == 3
    maps = bart.attention_maps([ids], decoder_token_ids=[target_ids])
    for kind, (queries, keys) in {"encoder": ("tokens", "tokens"), "decoder": ("target_tokens", "target_tokens"),
                                  "cross": ("target_tokens", "tokens")}.items():  # fmt: skip
        got = answer["kinds"][kind]
        assert (got["queries"], got["keys"]) == (queries, keys)
        assert torch.tensor(got["heads"]).sub(maps[kind][1, 0]).abs().max() <= 5e-5
    deepest = post(server, "/v1/inspect/attention", {"model": "bart", "text": source, "layer": 2})
    assert set(deepest["kinds"]) == {"decoder", "cross"}  # the encoder has two layers only
    encoder = post(server, "/v1/inspect/attention", {"model": "minilm", "text": "a cat sat on the mat"})
    ids = minilm.tokenizer.encode("a cat sat on the mat")
    assert encoder["family"] == "encoder" and encoder["tokens"][0]["token"] == "[CLS]"
    assert torch.tensor(encoder["kinds"]["self"]["heads"]).sub(minilm.attention_maps([ids])[0, 0]).abs().max() <= 5e-5


def test_embeddings_route_equals_the_python_api(server, tiny, minilm):
    words = ["king", "queen", "banana", "apple"]
    answer = post(server, "/v1/inspect/embeddings", {"model": "minilm", "inputs": words, "dims": 3})
    expected = geometry(minilm, words, 3)
    assert answer["source"] == "sentence embeddings" and len(answer["points"][0]) == 3
    assert torch.tensor(answer["points"]).sub(expected.points).abs().max() < 1e-6
    assert torch.tensor(answer["angle_degrees"]).sub(expected.angle_degrees).abs().max() < 1e-4
    decoder = post(server, "/v1/inspect/embeddings", {"model": "tiny", "inputs": ["Hello world", "Paris"]})
    assert decoder["source"] == "input embeddings (mean over tokens)" and len(decoder["points"]) == 2
    assert decoder["cosine"][0][0] == pytest.approx(1.0)


def test_model_view_gives_info_and_the_data_path(server):
    answer = httpx.get(f"{server.url}/v1/inspect/model", params={"model": "bart"}).json()
    assert answer["info"]["family"] == "encoder-decoder"
    stages = [s["stage"] for s in answer["path"]]
    assert stages[:3] == ["tokenizer", "embedding", "positions"] and stages[-2:] == ["lm_head", "softmax"]
    stacks = [s for s in answer["path"] if s["stage"] == "blocks"]
    assert [(s["stack"], s["count"]) for s in stacks] == [("encoder", 2), ("decoder", 3)]
    assert "cross_attention" in stacks[1] and stacks[1]["attention"]["causal"] is True
    tiny = httpx.get(f"{server.url}/v1/inspect/model", params={"model": "tiny"}).json()
    blocks = next(s for s in tiny["path"] if s["stage"] == "blocks")
    assert blocks["attention"] | {"dim": 64} == {"heads": 4, "kv_heads": 2, "head_dim": 16, "dim": 64, "causal": True}
    assert tiny["path"][0]["kind"] == "byte-level BPE"


TOO_LONG = {"model": "tiny", "token_ids": [5] * (MAX_ATTENTION_TOKENS + 1)}


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/inspect/attention", TOO_LONG, 413, "token_ids", "too_many_tokens"),
        ("/v1/inspect/attention", {"model": "tiny", "text": "hi", "layer": 2}, 400, "layer", None),
        ("/v1/inspect/attention", {"model": "tiny", "text": "  "}, 400, "text", None),
        ("/v1/inspect/attention", {"model": "tiny", "text": "hi", "token_ids": [1]}, 400, None, None),
        ("/v1/inspect/attention", {"model": "tiny", "text": "hi", "target": "x"}, 400, "text", None),
        ("/v1/inspect/attention", {"model": "nope", "text": "hi"}, 404, "model", "model_not_found"),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": []}, 400, "token_ids", None),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": [10**6]}, 400, "token_ids", None),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": [5] * 129}, 400, "token_ids", "context_length_exceeded"),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": [5], "top": 201}, 400, "top", None),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": [5], "chosen": 10**6}, 400, "chosen", None),
        ("/v1/inspect/stages", {"model": "tiny", "token_ids": [5], "settings": {"top_p": 0}}, 400, "settings.top_p", None),
        ("/v1/inspect/stages", {"model": "minilm", "token_ids": [5]}, 400, "model", "unsupported_model"),
        ("/v1/inspect/embeddings", {"model": "tiny", "inputs": ["one"]}, 400, "inputs", None),
        ("/v1/inspect/embeddings", {"model": "tiny", "inputs": ["a", ""]}, 400, "inputs", None),
        ("/v1/inspect/embeddings", {"model": "tiny", "inputs": ["a", "b"], "dims": 4}, 400, "dims", None),
    ],
)
def test_mistakes_are_4xx_in_the_openai_shape(server, path, body, status, param, code):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" or status == 404
    assert (error["param"], error["code"]) == (param, code)


def test_model_view_needs_a_known_model(server):
    assert httpx.get(f"{server.url}/v1/inspect/model").json()["error"]["param"] == "model"
    assert httpx.get(f"{server.url}/v1/inspect/model", params={"model": "x"}).status_code == 404


def test_inspecting_while_a_generation_streams_leaves_it_unchanged(tiny_llama_dir, tiny):
    """Forward passes for inspection run between the scheduler's steps: a stream running meanwhile
    gives what it gives alone."""
    slow = Model(SlowNetwork(tiny.network, 0.02), tiny.tokenizer, tiny.generation_defaults, tiny.source)
    for server in live({"slow": slow}):
        expected = tiny.generate("Hello", max_new_tokens=30, temperature=1.2, seed=4).text
        results = {}

        def stream() -> None:
            body = {"model": "slow", "prompt": "Hello", "max_tokens": 30, "temperature": 1.2, "seed": 4, "stream": True}
            events = sse_events(server.post("/v1/completions", body))[:-1]
            results["text"] = "".join(json.loads(e)["choices"][0]["text"] for e in events)

        thread = threading.Thread(target=stream)
        thread.start()
        for i in range(6):
            ids = tiny.tokenizer.encode("Inspect this, please")[: i + 2]
            post(server, "/v1/inspect/attention", {"model": "slow", "token_ids": ids})
            post(server, "/v1/inspect/stages", {"model": "slow", "token_ids": ids, "settings": {"temperature": 0.5}})
        thread.join(30)
        assert results["text"] == expected


def test_scheduler_jobs_run_between_steps_and_report_failures(tiny):
    from attendo.server.scheduler import Scheduler, ShuttingDown

    scheduler = Scheduler("tiny", tiny, max_batch=1, max_queue=1, max_len=64)
    scheduler.start()
    try:
        assert scheduler.call(lambda: threading.current_thread().name).result(10) == "attendo-scheduler-tiny"
        with pytest.raises(ZeroDivisionError):
            scheduler.call(lambda: 1 / 0).result(10)
        assert scheduler.call(lambda: "still running").result(10) == "still running"
    finally:
        scheduler.stop()
    with pytest.raises(ShuttingDown):
        scheduler.call(lambda: None)
