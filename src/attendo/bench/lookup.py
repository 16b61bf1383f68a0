"""Prompt-lookup decoding measured side by side (`attendo bench --prompt-lookup N`).

Each engine decodes the same prompts greedily (the same token ids, in the model's chat
template if it has one), once plainly and once with prompt lookup: attendo's (attendo.generation.lookup) and
llama.cpp's (llama-cpp-python's LlamaPromptLookupDecoding draft model, its defaults but for the
number of draft tokens). Prompts of two kinds: answers that copy their prompt (add type hints to
code, repeat or summarise a paragraph), where lookup should pay, and the short chat answers of
`Write one sentence about {t}.`, where it should not cost. Each engine runs in its own process
(`python -m attendo.bench.lookup ENGINE JSON` prints one JSON line), once per round, interleaved,
and decodes each prompt plainly and with lookup in turn, so the two modes meet the same machine.
Reported: decode tokens/s (after the first token; a group's tokens over their summed time),
lookup's speed over plain's, tokens per forward pass (1 for plain decoding) and the share of
draft tokens taken.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from attendo.bench.hardware import vector_flags
from attendo.bench.run import _cpu_name, engine_available

_CODE = '''def load_config(path, overrides=None):
    with open(path) as f:
        data = json.load(f)
    if overrides:
        for key, value in overrides.items():
            data[key] = value
    return data


def merge_counts(first, second):
    merged = dict(first)
    for word, count in second.items():
        merged[word] = merged.get(word, 0) + count
    return merged


def top_words(text, n=10, stopwords=None):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?")
        if stopwords and word in stopwords:
            continue
        counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    return ranked[:n]


class Inventory:
    def __init__(self, items=None):
        self.items = dict(items or {})

    def add(self, name, quantity=1):
        self.items[name] = self.items.get(name, 0) + quantity

    def remove(self, name, quantity=1):
        if self.items.get(name, 0) < quantity:
            raise ValueError("not enough " + name)
        self.items[name] -= quantity

    def total(self):
        return sum(self.items.values())
'''
_PARAGRAPH = (
    "The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. For more "
    "than a century its keepers climbed one hundred and twelve steps every evening to light the lamp, wind the "
    "clockwork that turned the lens, and record the weather in a leather-bound log. In 1964 the light was "
    "automated, and the last keeper moved to the mainland, taking the logbooks with him. Today the tower is a "
    "museum: visitors can climb the same steps, read the keepers' notes about storms and shipwrecks, and look "
    "out over the water where the beam still sweeps the sea every ten seconds."
)
TOPICS = ["a red apple", "the moon", "a lighthouse", "bread", "a violin", "rain", "a chess game", "volcanoes"]
# group → {name: the user's message}
PROMPTS: dict[str, dict[str, str]] = {
    "copying": {
        "code: add type hints": "Rewrite this code with type hints. Keep everything else the same.\n\n" + _CODE,
        "paragraph: repeat": "Repeat the following paragraph exactly:\n\n" + _PARAGRAPH,
        "paragraph: summarise": "Summarise the following paragraph in three sentences:\n\n" + _PARAGRAPH,
    },
    "chat": {topic: f"Write one sentence about {topic}." for topic in TOPICS},
}
NEW_TOKENS = 256
TIMES_EACH = 3  # decodes of each prompt per mode and round, alternating plain and lookup


def _alternating(decode: Any, prompts: list[list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Each prompt decoded plainly and with lookup in turn, TIMES_EACH times each (so that both
    modes see the same state of the machine); the figures of one mode summed per prompt."""
    decode(prompts[0], False)  # warm-up: the kernels' threads, scratch memory
    decode(prompts[0], True)
    figures: dict[str, list[dict[str, Any]]] = {"plain": [], "lookup": []}
    for ids in prompts:
        totals = {mode: Counter() for mode in figures}
        for _ in range(TIMES_EACH):
            for mode, total in totals.items():
                total.update(decode(ids, mode == "lookup"))
        for mode, total in totals.items():
            figures[mode].append(dict(total))
    return figures


def run_attendo(path: str, spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    import torch

    torch.set_num_threads(spec["threads"])
    import attendo
    from attendo.generation.lookup import LookupBatch
    from attendo.generation.loop import Batch, Request
    from attendo.generation.sampler import SamplingSettings

    model = attendo.load(path)

    def decode(ids: list[int], lookup: bool) -> dict[str, Any]:
        kind, extra = (LookupBatch, {"draft_tokens": spec["draft_tokens"]}) if lookup else (Batch, {})
        batch = kind(model.network, model.tokenizer, model.eos_token_ids, 1, len(ids) + NEW_TOKENS, **extra)
        sequence = batch.add(Request(ids, SamplingSettings(), NEW_TOKENS))
        while not sequence.generated:  # the prefill, and the first token from it
            batch.step()
        passes, start = 0, time.perf_counter()
        while batch.busy:
            batch.step()
            passes += 1
        seconds = time.perf_counter() - start
        drafted, accepted = getattr(batch, "drafted", 0), getattr(batch, "accepted", 0)
        return {"tokens": len(sequence.generated), "seconds": seconds, "passes": passes, "drafted": drafted, "accepted": accepted}

    return _alternating(decode, spec["prompts"])


def run_llama_cpp(path: str, spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    longest = max(len(ids) for ids in spec["prompts"]) + NEW_TOKENS + 16
    evals: list[int] = []

    def engine(draft_model: Any) -> Llama:
        llm = Llama(
            model_path=path, n_ctx=longest, n_threads=spec["threads"], n_threads_batch=spec["threads"],
            n_batch=longest, draft_model=draft_model, verbose=False,
        )  # fmt: skip
        plain_eval = llm.eval
        llm.eval = lambda tokens: (evals.append(len(tokens)), plain_eval(tokens))[1]  # count the passes
        return llm

    # A context with a draft model computes every position's logits; the plain one only the last.
    engines = {False: engine(None), True: engine(LlamaPromptLookupDecoding(num_pred_tokens=spec["draft_tokens"]))}
    stops = set(spec["eos_token_ids"])

    def decode(ids: list[int], lookup: bool) -> dict[str, Any]:
        llm = engines[lookup]
        llm.reset()  # no prefix kept from the previous prompt
        tokens, start = 0, 0.0
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            tokens += 1
            if tokens == 1:
                evals.clear()
                start = time.perf_counter()
            if token in stops or tokens == NEW_TOKENS:
                break
        seconds = time.perf_counter() - start
        # Each pass evaluates the last token and the draft; every token beyond one per pass was a draft's.
        drafted = sum(n - 1 for n in evals)
        return {"tokens": tokens, "seconds": seconds, "passes": len(evals), "drafted": drafted, "accepted": tokens - 1 - len(evals)}

    return _alternating(decode, spec["prompts"])


def _run(engine: str, path: str, spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "attendo.bench.lookup", engine, json.dumps({"path": path, **spec})],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} worker failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rate(runs: list[dict[str, Any]]) -> float:
    """Decode tokens/s over a group of prompts (the first token of each came from the prefill)."""
    return sum(r["tokens"] - TIMES_EACH for r in runs) / sum(r["seconds"] for r in runs)


def measure(model: str, draft_tokens: int, against: list[str], repeats: int, threads: int = 2) -> dict[str, Any]:
    import attendo
    from attendo.registry import resolve

    path = str(resolve(model))
    loaded = attendo.load(path)
    names = [name for group in PROMPTS.values() for name in group]
    # In the chat template where the model has one (a base model reads the request as plain text).
    chat = loaded.tokenizer.chat_template is not None
    encode = lambda text: loaded.encode_chat([{"role": "user", "content": text}]) if chat else loaded.tokenizer.encode(text)  # noqa: E731
    prompts = [encode(text) for group in PROMPTS.values() for text in group.values()]
    engines, skipped = ["attendo"], []
    for peer in against:
        reason = engine_available(peer) if peer == "llama.cpp" else "its prompt lookup is not measured here"
        if reason:
            skipped.append(f"{peer} skipped: {reason}")
        else:
            engines.append(peer)
    spec = {"prompts": prompts, "threads": threads, "eos_token_ids": loaded.eos_token_ids, "draft_tokens": draft_tokens}
    runs: dict[str, list[dict[str, list[dict[str, Any]]]]] = {engine: [] for engine in engines}
    for _ in range(repeats):  # interleaved: every engine once per round
        for engine in engines:
            runs[engine].append(_run(engine, path, spec))
    groups = {group: [names.index(n) for n in PROMPTS[group]] for group in PROMPTS}
    results: dict[str, dict[str, Any]] = {}
    for engine, rounds in runs.items():
        for mode in ("plain", "lookup"):
            label = engine if mode == "plain" else f"{engine} lookup"
            results[label] = {}
            for group, indexes in groups.items():
                rates = [_rate([one[mode][i] for i in indexes]) for one in rounds]
                chosen = [one[mode][i] for one in rounds for i in indexes]
                results[label][group] = {
                    "tps": statistics.median(rates), "min": min(rates), "max": max(rates),
                    "tokens_per_pass": sum(r["tokens"] - TIMES_EACH for r in chosen) / max(1, sum(r["passes"] for r in chosen)),
                    "acceptance": sum(r["accepted"] for r in chosen) / max(1, sum(r["drafted"] for r in chosen)),
                    "tokens": sum(rounds[0][mode][i]["tokens"] for i in indexes) // TIMES_EACH,
                }  # fmt: skip
    return {
        "model": path, "draft_tokens": draft_tokens, "when": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
        "machine": {"cpu": _cpu_name(), "cpu_flags": vector_flags(), "cores": os.cpu_count(), "threads": threads},
        "prompts": {name: len(ids) for name, ids in zip(names, prompts)}, "results": results, "raw": runs,
        "skipped": skipped,
    }  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    engines = list(report["results"])
    lines = ["| prompts | " + " | ".join(engines) + " |", "|" + "---|" * (len(engines) + 1)]
    for group in PROMPTS:
        cells = []
        for engine in engines:
            r = report["results"][engine][group]
            cell = f"{r['tps']:.1f} tok/s ({r['min']:.1f}-{r['max']:.1f})"
            if engine.endswith(" lookup"):
                plain = report["results"][engine.removesuffix(" lookup")][group]["tps"]
                cell += f", {r['tps'] / plain:.2f}x plain, {r['tokens_per_pass']:.2f} tokens/pass, {r['acceptance']:.0%} of drafts taken"
            if not engine.startswith("attendo"):  # the same mode of attendo over the peer
                ours = report["results"]["attendo lookup" if engine.endswith(" lookup") else "attendo"][group]["tps"]
                cell += f", attendo {ours / r['tps']:.2f}x"
            cells.append(cell)
        lines.append(f"| {group} ({len(PROMPTS[group])}) | " + " | ".join(cells) + " |")
    m = report["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']} ({m['cpu_flags']}), {m['cores']} cores, {m['threads']} threads per engine. "
        f"Greedy decode tokens/s after the first token, up to {NEW_TOKENS} tokens per prompt; median (min-max) "
        f"of {report['repeats']} interleaved rounds; lookup checks {report['draft_tokens']} draft tokens per step.",
        *report["skipped"],
    ]
    return "\n".join(lines)


def main(model: str, draft_tokens: int, against: list[str], repeats: int, out: Path | None) -> str:
    report = measure(model, draft_tokens, against, repeats)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return format_table(report)


if __name__ == "__main__":
    engine, spec = sys.argv[1], json.loads(sys.argv[2])
    run = {"attendo": run_attendo, "llama.cpp": run_llama_cpp}[engine]
    print(json.dumps(run(spec.pop("path"), spec)))
