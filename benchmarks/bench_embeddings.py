"""Sentence embeddings with the bundled all-MiniLM-L6-v2: attendo beside transformers.

    .venv/bin/python benchmarks/bench_embeddings.py [--threads 2] [--repeats 5] [--batch 32]

Both engines embed the same batch of English sentences (about 10 to 60 tokens each, cut from one passage,
in a fixed shuffled order) and are timed from text to normalized vectors, tokenization included:

- attendo: `attendo.load("all-minilm-l6-v2").embed(sentences, batch_size=--batch)`, what
  `attendo embed` calls (its default batch_size is 32);
- transformers: `BertModel` from the same safetensors directory, then the sentence-transformers
  recipe for one batch: tokenize with padding to the longest text and truncation to
  max_seq_length, mean over the real tokens, L2 normalisation.

Each engine runs in its own process with torch set to --threads threads; the engines take turns
(one process each per repeat). A process loads its model, embeds the batch --warmup times, then
--calls times under the clock; its median call is that repeat's figure. The report gives the median
(min-max) over repeats, attendo's speed over transformers', and the largest difference between the
two engines' vectors. JSON goes to --out (default benchmarks/results/embeddings.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# attendo is imported inside the functions that use it, so that a worker's load time includes
# importing its engine, as transformers' does.

MODEL = "all-minilm-l6-v2"
ENGINES = ("attendo", "transformers")
TOLERANCE = 1e-4  # largest acceptable difference between the engines' vector components


def sentences(count: int) -> list[str]:
    """count sentences of 7 to 44 words (about 10 to 60 MiniLM tokens), each a window of PASSAGE.

    Lengths are spread evenly, then put in a fixed shuffled order, as a user's texts would come.
    """
    from attendo.bench.workload import PASSAGE

    words = PASSAGE.split()
    ranks = list(range(count))
    random.Random(0).shuffle(ranks)
    texts = []
    for i, rank in enumerate(ranks):
        n_words = 7 + 37 * rank // max(count - 1, 1)
        start = (i * 11) % len(words)
        window = [words[(start + j) % len(words)] for j in range(n_words)]
        text = " ".join(window).rstrip(".,;:")
        texts.append(text[0].upper() + text[1:] + ".")
    return texts


Embed = Callable[[list[str]], torch.Tensor]


def _timed(embed: Embed, texts: list[str], warmup: int, calls: int) -> tuple[list[float], torch.Tensor]:
    for _ in range(warmup):
        embed(texts)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        vectors = embed(texts)
        seconds.append(time.perf_counter() - start)
    return seconds, vectors


def load_attendo(threads: int) -> Embed:
    """attendo's public API, as `attendo embed` uses it."""
    torch.set_num_threads(threads)
    import attendo

    model = attendo.load(MODEL)
    return lambda texts: model.embed(texts, batch_size=len(texts))


def load_transformers(threads: int) -> Embed:
    """transformers' BertModel on the same directory, pooled as sentence-transformers pools."""
    torch.set_num_threads(threads)
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertModel

    from attendo.registry import resolve

    directory = resolve(MODEL)
    max_length = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertModel.from_pretrained(directory, dtype=torch.float32).eval()

    @torch.inference_mode()
    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        real = batch["attention_mask"][..., None].to(hidden.dtype)
        mean = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)

    return embed


LOADERS = {"attendo": load_attendo, "transformers": load_transformers}


def worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One engine, one process: load, warm up, time; the vectors go to spec["vectors"]."""
    start = time.perf_counter()
    embed = LOADERS[engine](spec["threads"])
    load_s = time.perf_counter() - start
    from attendo.bench.worker import _peak_rss_mb

    texts = sentences(spec["batch"])
    seconds, vectors = _timed(embed, texts, spec["warmup"], spec["calls"])
    torch.save(vectors, spec["vectors"])
    return {
        "load_s": load_s,
        "call_s": seconds,
        "sentences_per_s": len(texts) / statistics.median(seconds),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", engine, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} worker failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(threads: int, repeats: int, batch: int, warmup: int, calls: int) -> dict[str, Any]:
    from attendo.bench.run import _cpu_name
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    vectors: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):  # interleaved: every engine once per round
            for engine in ENGINES:
                path = str(Path(scratch) / f"{engine}-{repeat}.pt")
                spec = {"threads": threads, "batch": batch, "warmup": warmup, "calls": calls, "vectors": path}
                runs[engine].append(run_worker(engine, spec))
                current = torch.load(path)
                if engine in vectors and not torch.equal(vectors[engine], current):
                    print(f"note: {engine} gave different vectors in repeat {repeat + 1}", file=sys.stderr)
                vectors.setdefault(engine, current)
    texts = sentences(batch)
    tokens = token_counts(texts)
    ours, theirs = vectors["attendo"], vectors["transformers"]
    results = {
        engine: {key: _spread([r[key] for r in runs[engine]]) for key in ("sentences_per_s", "load_s", "peak_rss_mb")}
        for engine in ENGINES
    }
    speed = {engine: results[engine]["sentences_per_s"]["median"] for engine in ENGINES}
    return {
        "model": MODEL,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "workload": {"sentences": batch, "tokens_min": min(tokens), "tokens_max": max(tokens),
                     "tokens_total": sum(tokens), "threads": threads, "warmup": warmup, "calls": calls},
        "repeats": repeats,
        "results": results,
        "ratio": speed["attendo"] / speed["transformers"],
        "max_abs_diff": float((ours - theirs).abs().max()),
        "shape": list(ours.shape),
        "raw": runs,
    }  # fmt: skip


def token_counts(texts: list[str]) -> list[int]:
    """Each text's length in MiniLM tokens, [CLS] and [SEP] included."""
    from tokenizers import Tokenizer

    from attendo.registry import resolve
    from attendo.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(Tokenizer.from_file(str(resolve(MODEL) / "tokenizer.json")))
    return [len(ids) for ids in tokenizer.encode_batch(texts)]


def format_report(report: dict[str, Any]) -> str:
    w, m = report["workload"], report["machine"]
    lines = ["| | sentences/s | cold load (s) | peak memory (MB) |", "|---|---|---|---|"]
    for engine, r in report["results"].items():
        cells = [f"{r[k]['median']:.3g} ({r[k]['min']:.3g}-{r[k]['max']:.3g})" for k in r]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"attendo / transformers: {report['ratio']:.2f}x sentences/s",
        f"max |attendo - transformers| over {report['shape'][0]}x{report['shape'][1]} vector components: "
        f"{report['max_abs_diff']:.2e}",
    ]
    if not report["max_abs_diff"] < TOLERANCE:
        lines.append(f"WARNING: the engines disagree by more than {TOLERANCE:g}: the speeds compare different results")
    lines += [
        "",
        f"{w['sentences']} sentences in one batch, {w['tokens_min']}-{w['tokens_max']} tokens each "
        f"({w['tokens_total']} in all, specials included); {MODEL}, float32.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {w['threads']} threads per engine, torch {m['torch']}. "
        f"Median (min-max) of {report['repeats']} interleaved processes per engine; each process's figure is "
        f"its median of {w['calls']} timed calls after {w['warmup']} warm-up calls.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each engine's process")
    parser.add_argument("--repeats", type=int, default=5, help="processes per engine, taking turns")
    parser.add_argument("--batch", type=int, default=32, help="sentences embedded together")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls in each process")
    parser.add_argument("--calls", type=int, default=5, help="timed calls in each process")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "embeddings.json"))
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, spec = args.worker
        print(json.dumps(worker(engine, json.loads(spec))))
        return
    if min(args.threads, args.repeats, args.batch, args.calls) < 1 or args.warmup < 0:
        parser.error("--threads, --repeats, --batch and --calls must be at least 1, --warmup at least 0")
    from attendo.bench.run import engine_available

    reason = engine_available("transformers")
    if reason:
        sys.exit(f"cannot compare: {reason}")
    report = measure(args.threads, args.repeats, args.batch, args.warmup, args.calls)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
