"""What structured output costs: constrained decoding beside free decoding on the bundled model.

    .venv/bin/python benchmarks/bench_structured.py [--threads 2] [--repeats 3] [--tokens 128]

One process loads SmolLM2-135M-Instruct (the GGUF's Q4_1 blocks, the default load) and times,
in interleaved rounds, the same chat prompt completed four ways through the generation loop
(attendo.generation.loop.Batch, what generate and the server use), greedy, each for exactly
--tokens new tokens: the batch is given no end-of-sequence ids, and each constraint admits no
end before far more text than that:

- free: no constraint;
- json_schema: {"story": string of at least 2000 characters}, so the grammar is live every step;
- regex: letters, spaces and punctuation, then "~~~" (which no greedy path here writes);
- regex_counted: letters, spaces and punctuation, at least 2000 characters.

It reports decode tokens/s per way at batch 1 and batch 4 (median over rounds), each as a ratio
to free decoding, and the grammar stage alone: microseconds to compute one token mask over the
49,152-token vocabulary, for those and for MASK_ONLY (constraints a greedy path may end early,
so they are not timed end to end). JSON goes to --out (default benchmarks/results/structured.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe, machine

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm, as JSON."}]
LONG = 2000  # characters: far more than --tokens tokens can hold, so no constrained output ends early
WAYS: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {"json_schema": {"type": "object", "properties": {"story": {"type": "string", "minLength": LONG}},
                                    "required": ["story"], "additionalProperties": False}},  # fmt: skip
    "regex": {"regex": "[A-Za-z ,.'!?\\n-]+~~~"},  # ends only at "~~~", which the class leaves out
    "regex_counted": {"regex": f"[A-Za-z ,.'!?\\n-]{{{LONG},}}"},  # a 2000-fold repetition: the costliest mask here
}
MASK_ONLY: dict[str, dict[str, Any]] = {"json_object": {"json_schema": {"type": "object"}}}


def decode_rate(model: Any, prompt: list[int], tokens: int, batch: int, constraint: dict[str, Any]) -> tuple[float, int]:
    """(generated tokens per second, tokens) for `batch` copies of the prompt, prefill excluded:
    a one-token run of the same batch is timed and taken off."""
    from attendo.generation.loop import Batch, Request
    from attendo.generation.sampler import SamplingSettings

    grammar = model.grammar(**constraint)  # compiled once per request, as the server does

    def run(n: int) -> tuple[float, int]:
        start = time.perf_counter()
        loop = Batch(model.network, model.tokenizer, [], slots=batch, max_len=len(prompt) + n)
        sequences = [loop.add(Request(prompt, SamplingSettings(), n, grammar=grammar)) for _ in range(batch)]
        while loop.busy:
            loop.step()
        return time.perf_counter() - start, sum(len(s.generated) for s in sequences)

    prefill, _ = run(1)
    seconds, generated = run(tokens)
    return (generated - batch) / (seconds - prefill), generated


def mask_microseconds(model: Any, constraint: dict[str, Any], steps: int = 200) -> float:
    """Median time of one grammar-stage mask (bool over the logits width) along a greedy path."""
    grammar = model.grammar(**constraint)
    state = grammar.start()
    logits = model.logits([model.encode_chat(PROMPT)])[0, -1]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        allowed = state.allowed()
        times.append(time.perf_counter() - start)
        token = int(logits.masked_fill(~allowed, -float("inf")).argmax())
        if state.finished or token in model.eos_token_ids:
            break
        state.advance(token)
        logits = torch.roll(logits, 7)  # a different preference each step, with no model call
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import attendo
    model = attendo.load("smollm2-135m-instruct")
    prompt = model.encode_chat(PROMPT)
    batches = [int(b) for b in args.batches.split(",")]
    rates: dict[str, dict[int, list[float]]] = {way: {b: [] for b in batches} for way in WAYS}
    for way, constraint in WAYS.items():  # warm-up: the first grammar builds the vocabulary
        decode_rate(model, prompt, 8, 1, constraint)
    for _ in range(args.repeats):
        for batch in batches:
            for way, constraint in WAYS.items():
                rate, generated = decode_rate(model, prompt, args.tokens, batch, constraint)
                assert generated == args.tokens * batch, f"{way} ended early ({generated} tokens)"
                rates[way][batch].append(rate)
    masks = {way: mask_microseconds(model, c) for way, c in {**WAYS, **MASK_ONLY}.items() if c}
    report = {
        "model": "smollm2-135m-instruct (Q4_1 blocks)",
        "threads": args.threads,
        "tokens": args.tokens,
        "machine": machine(),
        "tokens_per_second": {w: {b: statistics.median(r) for b, r in by.items()} for w, by in rates.items()},
        "all_rounds": rates,
        "mask_microseconds": masks,
    }
    free = report["tokens_per_second"]["free"]
    lines = [f"decode tokens/s, {args.tokens} tokens, {args.threads} threads, median of {args.repeats} rounds; {describe(report['machine'])}"]
    for way, by in report["tokens_per_second"].items():
        cells = [f"batch {b}: {r:6.1f} ({r / free[b]:.2f}x free)" for b, r in by.items()]
        mask = f"   mask {masks[way]:.0f} µs" if way in masks else ""
        lines.append(f"  {way:13s} " + "   ".join(cells) + mask)
    lines += [f"  {way:13s} mask {masks[way]:.0f} µs" for way in MASK_ONLY]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
