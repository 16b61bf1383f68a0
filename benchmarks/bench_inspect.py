"""The inspection routes' speed on the bundled model, measured at the server.

    .venv/bin/python benchmarks/bench_inspect.py [--threads 2] [--calls 20] [--no-transformers]

One process serves SmolLM2-135M-Instruct (the bundled GGUF, as `attendo serve` loads it) on a
loopback port, and a client times, from request to the whole JSON answer:

- stages, new context: /v1/inspect/stages for a context whose logits are not kept yet (one forward
  pass over it, then the sampler's stages), a 32-token prompt growing by one token per call, as
  a user clicking from token to token of an output;
- stages, slider move: the same context again with another temperature, top-k, top-p or min-p:
  the kept logits, the sampler's stages, and the JSON (`reused_logits: true`), the redraw path;
- attention: /v1/inspect/attention for a 200-token text, layer 0 and the last layer, all heads
  (the explicit attention path, then 9 x 200 x 200 weights rounded into JSON).

Beside it, in the same process and with the same threads, transformers on the same GGUF file
(dequantized to float32, as transformers loads GGUF) computes the same 200 tokens' attention with
output_attentions=True, the way a notebook tool (BertViz) gets it; attendo's attention is the same
forward pass plus the JSON. Median (min-max) of --calls calls after two warm-up calls; JSON goes to
--out (default benchmarks/results/inspect.json). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from machine import machine

MODEL = "smollm2-135m-instruct"


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def timed(call, calls: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        call(-1 - i)
    seconds = []
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - start)
    return seconds


def serve(model) -> tuple[uvicorn.Server, str]:
    from attendo.server import ServerSettings, create_app

    app = create_app(ServerSettings(models=[]), models={MODEL: model})
    # asyncio turns Nagle's algorithm off only on IPPROTO_TCP sockets; without it every answer
    # waits about 40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def measure_attendo(model, text_ids: list[int], prompt_ids: list[int], calls: int) -> dict:
    server, url = serve(model)
    http = httpx.Client(base_url=url, timeout=120)

    def post(path: str, body: dict) -> dict:
        response = http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def new_context(i: int) -> None:
        answer = post("/v1/inspect/stages", {"model": MODEL, "token_ids": prompt_ids[: 32 + 2 + i], "top": 20})
        assert not answer["reused_logits"]

    sliders = [{"temperature": 0.5 + 0.05 * (i % 20)} | ({"top_k": 1 + i % 50} if i % 2 else {"top_p": 0.5 + 0.02 * (i % 25)})
               for i in range(calls + 2)]  # fmt: skip

    def slider(i: int) -> None:
        answer = post("/v1/inspect/stages", {"model": MODEL, "token_ids": prompt_ids[:32], "settings": sliders[i], "top": 20})
        assert answer["reused_logits"] or i < 0

    sizes: dict[str, int] = {}

    def attention(layer: int):
        def call(_: int) -> None:
            response = http.post("/v1/inspect/attention", json={"model": MODEL, "token_ids": text_ids, "layer": layer})
            response.raise_for_status()
            sizes[str(layer)] = len(response.content)

        return call

    results = {
        "stages_new_context": summary(timed(new_context, calls)),
        "stages_slider_move": summary(timed(slider, calls)),
        "attention_200_tokens_layer_0": summary(timed(attention(0), calls)),
        "attention_200_tokens_last_layer": summary(timed(attention(-1), calls)),
        "attention_json_bytes": sizes["0"],
    }
    server.should_exit = True
    return results


def measure_transformers(model_path: Path, text_ids: list[int], calls: int) -> dict:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    reference.eval().set_attn_implementation("eager")
    tokens = torch.tensor([text_ids])

    def call(_: int) -> None:
        with torch.inference_mode():
            reference(tokens, output_attentions=True)

    return {"attention_200_tokens_all_layers": summary(timed(call, calls))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/inspect.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import attendo
    from attendo.bench.workload import prompt_ids
    from attendo.registry import registered_path

    model = attendo.load(MODEL)
    encode = model.tokenizer.encode
    text_ids = prompt_ids(lambda t: encode(t, add_special_tokens=False), 200)
    context = prompt_ids(lambda t: encode(t, add_special_tokens=False), 32 + args.calls + 4, variant=7)
    report: dict[str, Any] = {"machine": machine(), "threads": args.threads, "calls": args.calls}
    report["attendo"] = measure_attendo(model, text_ids, context, args.calls)
    if not args.no_transformers:
        report["transformers"] = measure_transformers(registered_path(MODEL), text_ids, args.calls)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
