"""The playground's speed in a real browser, on the bundled SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_playground.py [--threads 2] [--moves 40]

Starts `attendo serve` (a subprocess on a free loopback port, as bench_server.py does) and
Debian's chromium through Playwright, generates a greedy completion in the page, opens the
sampling stages of one of its steps, and measures, inside the page with performance.now():

- slider -> stages: from a slider's input event (temperature, top-k, top-p, min-p in turn, each
  move a new value) to the frame after the stages view was redrawn: the request to
  /v1/inspect/stages (the server keeps the step's logits, so only the sampler runs), the JSON, the
  table rebuilt and painted. --moves moves; median, p90 and max. Also the first open of a step,
  which runs one forward pass.
- attention: a text of --attention-tokens tokens; from the click on "Show attention" to the frame
  after layer 0's heatmap and head thumbnails were drawn (one forward pass that keeps the weights,
  JSON of heads x tokens x tokens, drawing), then the same for a layer change.

The same routes timed over HTTP without the browser show how much of each figure is the server.
Prints a table, writes JSON to --out (default benchmarks/results/playground.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx
from bench_server import free_port, percentile, start_server, wait_healthy
from machine import describe, machine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
PROMPT = "The capital of France is"
SLIDER_VALUES = {"temperature": [0.5, 0.7, 0.9, 1.2], "top_k": [5, 10, 20, 40], "top_p": [0.8, 0.9, 0.95, 0.6],
                 "min_p": [0.02, 0.05, 0.1, 0.01]}  # fmt: skip
PASSAGE = (
    "The lighthouse stood at the end of a narrow spit of rock, and for forty years the same family had kept "
    "its lamp burning through every storm the northern sea could raise. Each evening the keeper climbed the "
    "hundred and twelve steps, trimmed the wick, polished the great lens until it shone like still water, and "
    "wrote in the logbook the state of the wind, the height of the waves and the names of the ships that "
    "passed. In winter the spray froze on the gallery rail and the stairs rang with the cold; in summer the "
    "gulls nested on every ledge and the nights were so short that the lamp was lit for only a few hours. "
    "The keeper's daughter learned the work as a child, and when her father grew too old to climb she took "
    "the logbook and the keys and never spoke of leaving. Ships no longer needed the light by the time she "
    "was grey, for they carried their own maps of the stars, yet she kept it burning all the same."
)

# Acts on the element (selector, index among its matches) as a user does: a click, or a new value
# and its event ("input" for a slider, "change" for a <select>); then resolves, once the element
# with id `panel` has redrawn (its dataset.renders grew) and the next frame is painted, to the
# milliseconds that took.
UNTIL_DRAWN = """async ([selector, index, value, event, panel]) => {
  const node = document.getElementById(panel);
  const before = Number(node.dataset.renders || 0);
  const target = document.querySelectorAll(selector)[index];
  const started = performance.now();
  if (value === null) target.click();
  else {
    target.value = String(value);
    target.dispatchEvent(new Event(event, { bubbles: true }));
  }
  await new Promise((done) => {
    const check = () => (Number(node.dataset.renders) > before ? done() : requestAnimationFrame(check));
    check();
  });
  await new Promise((done) => requestAnimationFrame(() => done()));
  return performance.now() - started;
}"""


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values), "p90_ms": percentile(values, 90), "max_ms": max(values), "n": len(values)}


def text_of(url: str, model: str, tokens: int) -> str:
    """A text of exactly `tokens` tokens under the model's tokenizer (the passage, repeated and cut)."""
    ids = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": PASSAGE * 4}, timeout=30).json()["tokens"]
    for count in range(tokens, tokens - 8, -1):  # decoding and encoding again can merge across the cut
        text = httpx.post(f"{url}/detokenize", json={"model": model, "tokens": ids[:count]}, timeout=30).json()["prompt"]
        again = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": text}, timeout=30).json()["count"]
        if again == tokens:
            return text
    raise SystemExit(f"could not cut the passage to exactly {tokens} tokens")


def server_only(url: str, model: str, context: list[int], text: str, repeats: int) -> dict[str, dict[str, float]]:
    """The routes the page calls, over HTTP without the browser."""
    stages, attention = [], []
    with httpx.Client(timeout=120) as http:
        for i in range(repeats):
            settings = {"do_sample": True, "temperature": SLIDER_VALUES["temperature"][i % 4], "top_k": 0, "top_p": 1, "min_p": 0}
            started = time.perf_counter()
            http.post(f"{url}/v1/inspect/stages", json={"model": model, "token_ids": context, "settings": settings, "top": 15}).raise_for_status()
            stages.append((time.perf_counter() - started) * 1000)
        for layer in range(min(repeats, 5)):
            started = time.perf_counter()
            http.post(f"{url}/v1/inspect/attention", json={"model": model, "text": text, "layer": layer}).raise_for_status()
            attention.append((time.perf_counter() - started) * 1000)
    return {"stages_route": summary(stages), "attention_route": summary(attention)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2, help="passed to attendo serve --threads")
    parser.add_argument("--moves", type=int, default=40, help="slider moves timed")
    parser.add_argument("--attention-tokens", type=int, default=200)
    parser.add_argument("--attention-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "playground.json"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args.model, port, out.with_suffix(".log"), args.threads)
    try:
        wait_healthy(url, process)
        text = text_of(url, args.model, args.attention_tokens)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(120_000)
            page.goto(f"{url}/")
            page.wait_for_selector(f'#model option[value="{args.model}"]', state="attached")
            page.fill("#prompt", PROMPT)
            page.fill('input[name="max_tokens"]', "8")
            page.click("#generate")
            page.wait_for_function("document.getElementById('stats').textContent.includes('finished')")
            first_open = page.evaluate(UNTIL_DRAWN, ["#output .gen-token", 2, None, None, "stages-table"])
            page.check('#stage-controls input[name="do_sample"]')
            page.wait_for_function("Number(document.getElementById('stages-table').dataset.renders) >= 2")
            names = list(SLIDER_VALUES)
            moves = []
            for i in range(args.moves + len(names)):  # the first round warms up
                name = names[i % len(names)]
                slider = f'#stage-controls input[name="{name}"]'
                took = page.evaluate(UNTIL_DRAWN, [slider, 0, SLIDER_VALUES[name][(i // len(names)) % 4], "input", "stages-table"])
                if i >= len(names):
                    moves.append(took)
            step = int(page.get_attribute("#output .gen-token >> nth=2", "data-step"))

            page.click("#tab-attention")
            page.fill("#attention-text", text)
            shown, layers = [], []
            for i in range(args.attention_repeats):
                page.evaluate("() => { document.getElementById('attention-layer').value = '0'; }")
                shown.append(page.evaluate(UNTIL_DRAWN, ["#attention-run", 0, None, None, "attention-panel"]))
                layers.append(page.evaluate(UNTIL_DRAWN, ["#attention-layer", 0, str(1 + i), "change", "attention-panel"]))
            stats = page.text_content("#attention-stats")
            browser.close()
        record = httpx.post(f"{url}/v1/completions", json={"model": args.model, "prompt": PROMPT, "max_tokens": 8,
                                                            "temperature": 0, "return_token_ids": True}, timeout=60).json()  # fmt: skip
        context = record["prompt_token_ids"] + record["choices"][0]["token_ids"][:step]  # the step the page showed
        routes = server_only(url, args.model, context, text, args.moves // 2)
    finally:
        process.terminate()
        process.wait(60)

    report = {
        "model": args.model,
        "threads": args.threads,
        "machine": {**machine(), "load_average": os.getloadavg()},
        "stages_first_open_ms": first_open,
        "slider_to_redrawn_stages": summary(moves),
        "attention_tokens": args.attention_tokens,
        "attention_page_stats": stats,
        "attention_click_to_drawn": summary(shown),
        "attention_layer_change_to_drawn": summary(layers),
        **routes,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.model}, attendo serve --threads {args.threads}; {describe(report['machine'])}")
    print("| what | median (ms) | p90 (ms) | max (ms) | n |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("slider move -> stages redrawn (browser)", report["slider_to_redrawn_stages"]),
        ("  of which /v1/inspect/stages alone (HTTP)", report["stages_route"]),
        (f"attention, {args.attention_tokens} tokens, click -> drawn (browser)", report["attention_click_to_drawn"]),
        ("attention, layer change -> drawn (browser)", report["attention_layer_change_to_drawn"]),
        ("  of which /v1/inspect/attention alone (HTTP)", report["attention_route"]),
    ]
    for label, s in rows:
        print(f"| {label} | {s['median_ms']:.0f} | {s['p90_ms']:.0f} | {s['max_ms']:.0f} | {s['n']} |")
    print(f"\nfirst open of a step's stages (one forward pass): {first_open:.0f} ms; JSON in {out}")


if __name__ == "__main__":
    main()
