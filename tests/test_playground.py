"""The web playground (`attendo serve` at /) in a real headless browser: Playwright for Python
driving Debian's chromium against a live server on a loopback port.

One browser and one server serve every test. The server holds tiny random models: a LLaMA, the
same network slowed down (to stop a generation halfway), the same network nudged to write
`<script>` (to check that model text stays text), and a tiny T5 (encoder-decoder attention). What
the page shows is checked against the server's API and the Python API: the same greedy text, the
stages the route computes, the attention weights and cosines the routes return. Screenshots of
each view go to tests/artifacts/playground/ (not committed).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from test_seq2seq import _t5_v10
from test_server import LiveServer, SlowNetwork, live, wait_until

import attendo
from attendo.model import Model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).parent / "artifacts" / "playground"
ROOT = Path(__file__).parent.parent
STATIC = ROOT / "src" / "attendo" / "server" / "static"
TIMEOUT_MS = 20_000
SCRIPT_PROMPT = "<script>window.injected=2</script> Say it:"
SCRIPT_OUTPUT = "<script>window.injected=1</script>"


class ScriptedNetwork(torch.nn.Module):
    """The tiny network, nudged to write `script` right after a prompt of `prompt_length`
    tokens: a model that answers SCRIPT_PROMPT with SCRIPT_OUTPUT (its logits stay real)."""

    def __init__(self, inner: torch.nn.Module, prompt_length: int, script: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.prompt_length = prompt_length
        self.script = script

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, tokens, positions=None, *, logits_index=None, **kwargs):
        logits = self.inner(tokens, positions, logits_index=logits_index, **kwargs)
        if positions is None:
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
        if logits_index is not None:
            positions = positions[torch.arange(len(tokens)), logits_index]
        nudge = torch.zeros_like(logits)
        for k, token in enumerate(self.script):  # the logits at position p choose the token at p + 1
            nudge[..., token] += 100.0 * (positions == self.prompt_length - 1 + k)
        return logits + nudge


def scripted(model: Model) -> Model:
    prompt_length = len(model.tokenizer.encode(SCRIPT_PROMPT))
    script = model.tokenizer.encode(SCRIPT_OUTPUT, add_special_tokens=False)
    network = ScriptedNetwork(model.network, prompt_length, script)
    return Model(network, model.tokenizer, model.generation_defaults, model.source)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (bash scripts/setup.sh --test, "
                    "or apt-get install -y chromium)")  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the playwright package: bash scripts/setup.sh --test")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> Model:
    return attendo.load(tiny_llama_dir)


@pytest.fixture(scope="module")
def site(tiny, tiny_llama_dir, tmp_path_factory) -> Iterator[LiveServer]:
    t5_dir, _ = _t5_v10(tmp_path_factory)
    slow = attendo.load(tiny_llama_dir)
    models = {
        "tiny": tiny,
        "slow": Model(SlowNetwork(slow.network, 0.05), slow.tokenizer, slow.generation_defaults, slow.source),
        "scripted": scripted(attendo.load(tiny_llama_dir)),
        "t5": attendo.load(t5_dir),
    }
    yield from live(models, max_batch=4, max_queue=8)


@pytest.fixture
def page(browser, request):
    """A fresh page (its own storage) at 1280x800 that fails the test on any script error, and
    leaves a screenshot named after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, errors


def open_playground(page, server: LiveServer, model: str = "tiny") -> None:
    page.goto(f"{server.url}/")
    page.wait_for_selector(f'#model option[value="{model}"]', state="attached")
    page.select_option("#model", model)


def set_generation(page, *, prompt: str | None = None, max_tokens: int = 8, sample: bool = False) -> None:
    if prompt is not None:
        page.fill("#prompt", prompt)
    page.fill('input[name="max_tokens"]', str(max_tokens))
    page.check(f'input[name="decoding"][value="{"sample" if sample else "greedy"}"]')


def generate_and_wait(page) -> None:
    page.click("#generate")
    page.wait_for_function("document.getElementById('stats').textContent.includes('finished')")


def generated_text(page) -> str:
    return page.eval_on_selector("#output .generated", "node => node.textContent")


def set_slider(page, name: str, value: float) -> None:
    """Move a stages slider as a user would (an input event) and wait for the redraw."""
    before = int(page.get_attribute("#stages-table", "data-renders") or 0)
    page.eval_on_selector(
        f'#stage-controls input[name="{name}"]',
        "(node, value) => { node.value = value; node.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(value),
    )
    page.wait_for_function(f"Number(document.getElementById('stages-table').dataset.renders) > {before}")


def final_column(page) -> list[tuple[int, float]]:
    """(token id, p) of each row's final-stage cell, as the page shows them."""
    return page.eval_on_selector_all(
        "#stages-table .st-row[data-id]",
        "rows => rows.map(r => [Number(r.dataset.id), Number(r.lastElementChild.dataset.p || 'NaN')])",
    )


def greedy_completion(server: LiveServer, model: str, prompt, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def running_sequences(server: LiveServer, model: str) -> int:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return int(re.search(rf'^attendo_running_sequences{{model="{model}"}} (\d+)', text, re.M).group(1))


# --- the page ---------------------------------------------------------------------------------


def test_the_page_loads_only_from_its_server_and_ships_in_the_package(page, site):
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    open_playground(page, site)
    assert page.title() == "attendo playground"
    for view in ("tokens", "stages", "attention", "embeddings", "model", "generate"):
        page.click(f"#tab-{view}")
        assert page.is_visible(f"#view-{view}")
        assert page.get_attribute(f"#tab-{view}", "aria-selected") == "true"
    page.wait_for_selector("#model-info tr", state="attached")
    assert requested and all(url.startswith(site.url) for url in requested), requested
    # Every file of the page is package data, so that an installed wheel serves it.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["attendo"]
    for file in STATIC.rglob("*"):
        if file.is_file():
            relative = f"server/static/{file.relative_to(STATIC).as_posix()}"
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in package-data"


def test_greedy_completion_shows_the_apis_text_token_by_token(page, site, tiny):
    open_playground(page, site)
    set_generation(page, prompt="The quick brown fox", max_tokens=10)
    generate_and_wait(page)
    expected = greedy_completion(site, "tiny", "The quick brown fox", 10)["choices"][0]
    assert generated_text(page) == expected["text"] == tiny.generate("The quick brown fox", max_new_tokens=10, do_sample=False).text
    steps = page.eval_on_selector_all("#output .gen-token", "nodes => nodes.map(n => Number(n.dataset.step))")
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) <= 10
    stats = page.text_content("#stats")
    assert "10 generated" in stats and "tokens/s" in stats and "finished (max tokens)" in stats


def test_chat_keeps_the_conversation(page, site):
    open_playground(page, site)
    page.check('input[name="mode"][value="chat"]')
    set_generation(page, max_tokens=6)
    page.fill("#user-message", "Hello there")
    generate_and_wait(page)
    page.wait_for_function("document.querySelectorAll('#conversation .message').length === 2")
    first = page.text_content("#conversation .message.assistant .message-body")
    page.fill("#user-message", "And then?")
    generate_and_wait(page)
    page.wait_for_function("document.querySelectorAll('#conversation .message').length === 4")
    second = page.eval_on_selector_all("#conversation .message.assistant .message-body", "n => n[1].textContent")
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "And then?"}]  # fmt: skip
    answer = site.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert second == answer.json()["choices"][0]["message"]["content"]


def test_stop_aborts_the_request_and_the_server_frees_the_slot(page, site):
    open_playground(page, site, "slow")
    set_generation(page, prompt="Hello", max_tokens=100)  # 100 steps of 50 ms if left alone
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#output .gen-token').length >= 3")
    assert running_sequences(site, "slow") == 1
    page.click("#stop")
    wait_until(lambda: running_sequences(site, "slow") == 0, 2.0, "the stopped generation to leave its slot")
    page.wait_for_function("document.getElementById('stats').textContent.includes('stopped')")
    generated = int(re.search(r"(\d+) generated", page.text_content("#stats")).group(1))
    assert 3 <= generated < 100
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")


def test_sampling_stages_follow_the_sliders(page, site):
    open_playground(page, site)
    set_generation(page, prompt="Paris is", max_tokens=6)
    generate_and_wait(page)
    page.click('#output .gen-token[data-step="2"]')
    assert page.is_visible("#view-stages")
    page.wait_for_selector("#stages-table .st-row[data-id]")
    stages = page.eval_on_selector_all("#stages-table .st-head", "nodes => nodes.map(n => n.dataset.stage)")
    assert stages == ["raw", "penalties", "temperature", "top_k", "top_p", "min_p", "final"]
    record = greedy_completion(site, "tiny", "Paris is", 6)
    context = record["prompt_token_ids"] + record["choices"][0]["token_ids"][:2]
    chosen = record["choices"][0]["token_ids"][2]
    assert int(page.get_attribute("#stages-table .st-row.chosen", "data-id")) == chosen
    assert [p for _, p in final_column(page) if p > 0] == [1.0]  # greedy: all mass on the argmax

    page.check('#stage-controls input[name="do_sample"]')
    page.wait_for_function("document.getElementById('stages-table').dataset.renders >= 2")
    set_slider(page, "temperature", 1.0)
    at_one = dict(final_column(page))
    set_slider(page, "temperature", 0.5)
    at_half = dict(final_column(page))
    top = max(at_one, key=at_one.get)
    assert at_half[top] > at_one[top]  # a lower temperature sharpens the distribution
    settings = {"do_sample": True, "temperature": 0.5, "top_k": 0, "top_p": 1, "min_p": 0, "repetition_penalty": 1}
    api = site.post("/v1/inspect/stages", {"model": "tiny", "token_ids": context, "settings": settings, "top": 15}).json()
    final = {t["id"]: t["p"] for t in api["stages"][-1]["tokens"]}
    assert at_half[top] == pytest.approx(final[top], abs=1e-6)
    assert api["reused_logits"]

    set_slider(page, "top_k", 3)
    kept = page.text_content('#stages-table .st-head[data-stage="top_k"] .st-stats')
    assert kept.startswith("3 kept")
    assert len([p for _, p in final_column(page) if p > 0]) == 3
    assert page.locator("#stages-table .st-cell.cut-below").count() >= 1  # the cut-off is drawn


def test_continue_from_an_alternative_token(page, site):
    open_playground(page, site)
    set_generation(page, prompt="The capital of", max_tokens=6)
    generate_and_wait(page)
    step = int(page.get_attribute("#output .gen-token >> nth=1", "data-step"))
    page.click(f'#output .gen-token[data-step="{step}"]')
    page.wait_for_selector("#stages-table .st-row[data-id]")
    alternative = page.locator("#stages-table .st-row[data-id]:not(.chosen)").first
    token_id = int(alternative.get_attribute("data-id"))
    alternative.click()
    assert page.is_enabled("#branch")
    page.click("#branch")
    assert page.is_visible("#view-generate")
    page.wait_for_function("document.getElementById('stats').textContent.includes('finished')")
    first = greedy_completion(site, "tiny", "The capital of", 6)
    context = first["prompt_token_ids"] + first["choices"][0]["token_ids"][:step] + [token_id]
    rest = greedy_completion(site, "tiny", context, 6 - step - 1)["choices"][0]["text"]  # 6 tokens in all, as before
    branched = page.eval_on_selector("#output .gen-token.branched", "n => Number(n.dataset.step)")
    assert branched == step
    after = page.eval_on_selector_all(
        "#output .gen-token", "(nodes, step) => nodes.filter(n => Number(n.dataset.step) > step).map(n => n.textContent).join('')", step
    )
    assert after == rest


def test_tokens_view_shows_bytes_spaces_and_ids(page, site, tiny):
    open_playground(page, site)
    page.click("#tab-tokens")
    page.check("#show-ids")
    page.fill("#tokenize-text", "Hello world 😀")
    page.click("#tokenize")
    expected = tiny.tokenizer.encode("Hello world 😀")
    # Opening the view tokenized the default text first: wait for this text's boxes.
    page.wait_for_function("n => document.querySelectorAll('#tokenized .tok-id').length === n", arg=len(expected))
    ids = page.eval_on_selector_all("#tokenized .tok-id", "nodes => nodes.map(n => Number(n.textContent))")
    assert ids == expected
    shown = page.eval_on_selector_all("#tokenized .tok", "nodes => nodes.map(n => n.textContent)")
    strings = site.post("/tokenize", {"model": "tiny", "prompt": "Hello world 😀", "return_token_strs": True}).json()["token_strs"]
    assert shown == [s.replace(" ", "·") for s in strings]  # each token as the API names it, spaces made visible
    assert "\ufffd" not in "".join(shown)
    assert any("<0xF0>" in s for s in shown)  # the emoji's first byte, not a replacement character
    assert any(s.startswith("·") for s in shown)


def test_model_text_and_user_text_are_never_html(page, site):
    open_playground(page, site, "scripted")
    set_generation(page, prompt=SCRIPT_PROMPT, max_tokens=len(SCRIPT_OUTPUT))
    generate_and_wait(page)
    assert generated_text(page).startswith(SCRIPT_OUTPUT)
    assert page.text_content("#output .prompt-text").startswith("<script>window.injected=2</script>")
    page.click("#tab-tokens")
    page.wait_for_selector("#output-tokens .tok-box")
    assert "<script>" in page.text_content("#output-tokens").replace("·", " ")
    page.click("#tab-generate")
    page.check('input[name="mode"][value="chat"]')
    page.fill("#user-message", "<script>window.injected=3</script>")
    generate_and_wait(page)
    assert page.text_content("#conversation .message.user .message-body") == "<script>window.injected=3</script>"
    assert page.locator("main script").count() == 0
    assert page.evaluate("window.injected") is None


def test_attention_of_a_decoder_and_of_an_encoder_decoder(page, site, tiny):
    open_playground(page, site)
    page.click("#tab-attention")
    page.fill("#attention-text", "The cat sat on the mat")
    page.click("#attention-run")
    page.wait_for_selector("#attention-grid .thumb-button")
    heads = tiny.config.n_heads
    assert page.locator("#attention-grid .thumb-button").count() == heads + 1  # every head and their average
    assert page.locator("#attention-layer option").count() == tiny.config.n_layers
    # Walk the keyboard cursor to query 3, key 1 and read the weight the page shows.
    page.focus("#attention-canvas")
    for key in ["ArrowDown"] * 3 + ["ArrowRight"]:
        page.keyboard.press(key)
    shown = float(re.search(r"(\d\.\d{4}) of the query", page.text_content("#tooltip")).group(1))
    api = site.post("/v1/inspect/attention", {"model": "tiny", "text": "The cat sat on the mat", "layer": 0}).json()
    assert shown == pytest.approx(api["kinds"]["self"]["average"][3][1], abs=1e-4)
    ids = tiny.tokenizer.encode("The cat sat on the mat")
    expected = tiny.attention_maps([ids])[0, 0].mean(0)  # layer 0, heads averaged: (queries, keys)
    assert shown == pytest.approx(float(expected[3, 1]), abs=2e-4)

    page.fill("#attention-text", "hello world " * 300)  # beyond the route's limit: its 413 message is shown
    page.click("#attention-run")
    page.wait_for_selector("#error:not([hidden])")
    too_long = site.post("/v1/inspect/attention", {"model": "tiny", "text": "hello world " * 300})
    assert too_long.status_code == 413 and page.text_content("#error-text") == too_long.json()["error"]["message"]

    page.select_option("#model", "t5")
    assert page.is_visible("#attention-target")
    page.fill("#attention-text", "the house is big")
    page.fill("#attention-target", "the house")
    page.click("#attention-run")
    page.wait_for_selector("#attention-grid .thumb-button")
    kinds = page.eval_on_selector_all("#attention-kind option", "nodes => nodes.map(n => n.value)")
    assert sorted(kinds) == ["cross", "decoder", "encoder"]
    page.select_option("#attention-kind", "cross")
    caption = page.text_content("#attention-caption")
    assert "cross-attention" in caption
    api = site.post("/v1/inspect/attention", {"model": "t5", "text": "the house is big", "target": "the house"}).json()
    assert f"{len(api['target_tokens'])} queries × {len(api['tokens'])} keys" in caption


def test_embeddings_in_3d_rotate_and_compare_two_points(page, site):
    words = ["king", "queen", "cat", "dog", "Paris"]
    open_playground(page, site)
    page.click("#tab-embeddings")
    page.fill("#embed-inputs", "\n".join(words))
    page.click("#embed-run")
    page.wait_for_function("document.getElementById('embed-pair').textContent.includes('cosine')")
    api = site.post("/v1/inspect/embeddings", {"model": "tiny", "inputs": words, "dims": 3}).json()
    assert f"cosine {api['cosine'][0][1]:.3f}" in page.text_content("#embed-pair")
    assert f"angle {api['angle_degrees'][0][1]:.1f}°" in page.text_content("#embed-pair")
    canvas = page.locator("#embed-canvas")
    before = canvas.screenshot()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 220, box["y"] + 140, steps=6)
    page.mouse.up()
    assert canvas.screenshot() != before  # dragging turned the cloud
    assert f"cosine {api['cosine'][0][1]:.3f}" in page.text_content("#embed-pair")  # the picked pair stays


def test_api_key_is_asked_once_and_sent(browser, tiny_llama_dir):
    for server in live({"tiny": attendo.load(tiny_llama_dir)}, api_key="sekrit"):
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:not([hidden])")
        page.fill("#key-input", "sekrit")
        page.click("#key-form button")
        page.wait_for_selector('#model option[value="tiny"]', state="attached")
        set_generation(page, prompt="Hello", max_tokens=3)
        generate_and_wait(page)
        assert generated_text(page)
        page.reload()  # the key is kept for the session: no second question
        page.wait_for_selector('#model option[value="tiny"]', state="attached")
        assert not page.is_visible("#key-dialog")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "api_key.png"))
        context.close()
