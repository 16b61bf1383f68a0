"""Training speed: `attendo train` beside a plain transformers training loop, in one run.

    .venv/bin/python benchmarks/bench_train.py [--threads 2] [--rounds 5] [--steps 20] [--warmup 4]

Both sides do the same work, and the report shows it:

- the same model: the llama-mini preset (dim 256, 4 layers, 4 query and 2 key/value heads, SwiGLU
  688, a 4096-token vocabulary tied to the head, about 4M parameters), with the same initial
  weights: attendo's initialisation, written once as a Hugging Face directory that
  LlamaForCausalLM loads (attn_implementation="sdpa", or "eager" where the variant says so);
- the same data: one tokenizer, one stream of token ids cut into rows of 256, the same rows in
  the same order at every step (attendo's GlobalOrder), 8 rows a step;
- the same loss (mean cross-entropy of every next token; transformers is handed the shifted
  labels, so neither side drops a position), the same AdamW, torch's fused kernel (two groups:
  weight decay on the weight matrices only; the same learning-rate schedule; fused is what
  transformers' Trainer uses by default with torch 2.8 or later), gradient clipping at 1, the same thread
  count. The losses of every step are recorded: at float32 the two sides agree to a few 1e-5 at
  the first step and stay close, which is the check that they train the same thing.

attendo is `attendo train` itself (attendo.train.pretrain, no evaluation or checkpoint inside the
timed steps; the progress bar and the log are); transformers is a loop of forward with labels,
backward, clip, AdamW step. Each variant runs in its own process; one round runs every variant
once (alternating the order from round to round), and the report gives for each variant the
median tokens per second over rounds with the range, and for each attendo variant the ratio to
transformers at the same precision *within each round* (median and range): this VM's speed
drifts by up to 30% from minute to minute, and a ratio of neighbouring runs cancels most of it.
JSON to --out (default benchmarks/results/train.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe, machine

# name: (engine, precision, compiled); transformers runs SDPA attention unless the name says eager
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "attendo bfloat16": ("attendo", "bfloat16", False),
    "attendo bfloat16 --compile": ("attendo", "bfloat16", True),
    "attendo float32": ("attendo", "float32", False),
    "attendo float32 --compile": ("attendo", "float32", True),
    "transformers bfloat16": ("transformers", "bfloat16", False),
    "transformers float32": ("transformers", "float32", False),
    "transformers bfloat16 compiled": ("transformers", "bfloat16", True),
    "transformers bfloat16 compiled (eager attention)": ("transformers", "bfloat16", True),
}
DEFAULT_VARIANTS = (
    "attendo bfloat16", "attendo bfloat16 --compile", "attendo float32", "transformers bfloat16", "transformers float32",
)  # fmt: skip
PRESET, BATCH, SEQ_LEN, VOCAB = "llama-mini", 8, 256, 4096
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "clip": 1.0, "seed": 0}


def _settings(spec: dict[str, Any]) -> Any:
    from attendo.train.settings import TrainSettings

    return TrainSettings(
        steps=spec["warmup"] + spec["steps"], batch_size=BATCH, eval_every=10**6, save_every=10**6,
        precision=spec["precision"], compile=spec["compiled"], **HYPER,
    )  # fmt: skip


def corpus() -> str:
    """About 240k tokens of made-up words (1-4 syllables) drawn with Zipf's law, as words are:
    enough variety that the byte-level BPE fills all 4096 entries of its vocabulary."""
    import random

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30000)})
    rng.shuffle(words)
    weights = [1 / rank for rank in range(1, len(words) + 1)]
    return "\n".join(" ".join(rng.choices(words, weights, k=40)) for _ in range(4000))


def prepare(folder: Path) -> None:
    """The shared inputs: folder/corpus.txt and folder/start, a Hugging Face directory with a
    tokenizer trained on the corpus and attendo's initial weights."""
    from attendo.models import build_network
    from attendo.train import export
    from attendo.train.bpe import train_bpe
    from attendo.train.checkpoint import full_weights
    from attendo.train.pretrain import initialise, model_config

    text = corpus()
    (folder / "corpus.txt").write_text(text)
    tokenizer = train_bpe([text], VOCAB)
    if tokenizer.vocab_size != VOCAB:
        raise RuntimeError(f"the corpus gave a vocabulary of {tokenizer.vocab_size}, not {VOCAB}")
    config = model_config(tokenizer, SEQ_LEN, PRESET, None, {})
    torch.manual_seed(HYPER["seed"])  # as attendo.train.pretrain draws its initial weights
    network = build_network(config)
    initialise(network)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0]}
    export.save_hf_directory(folder / "start", full_weights(network), config, tokenizer, export.hf_config(config), generation)


def run_attendo(spec: dict[str, Any]) -> dict[str, Any]:
    from attendo.train.pretrain import pretrain
    from attendo.train.report import read_log

    shared = Path(spec["shared"])
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        pretrain([shared / "corpus.txt"], out, _settings(spec), preset_name=PRESET, seq_len=SEQ_LEN,
                 tokenizer=str(shared / "start"), eval_fraction=0.0)  # fmt: skip
        log = read_log(out)
    timed = log[spec["warmup"] :]
    seconds = timed[-1]["elapsed"] - log[spec["warmup"] - 1]["elapsed"]
    return {"tokens_per_s": BATCH * SEQ_LEN * len(timed) / seconds, "losses": [line["loss"] for line in log]}


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from attendo.loader import load_tokenizer
    from attendo.train.data import GlobalOrder, PackedTokens
    from attendo.train.loop import parameter_groups
    from attendo.train.pretrain import documents_to_stream
    from attendo.train.settings import learning_rate

    shared = Path(spec["shared"])
    tokenizer = load_tokenizer(shared / "start")
    stream = documents_to_stream(tokenizer, [(shared / "corpus.txt").read_text()], tokenizer.token_to_id(tokenizer.eos_token))
    rows = PackedTokens(stream, SEQ_LEN)
    settings = _settings(spec)
    order = GlobalOrder(len(rows), BATCH, settings.seed)
    attention = "eager" if spec["name"].endswith("(eager attention)") else "sdpa"
    model = LlamaForCausalLM.from_pretrained(shared / "start", attn_implementation=attention, dtype=torch.float32).train()
    forward = torch.compile(model) if spec["compiled"] else model
    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay), lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=1e-8,
        fused=True,
    )  # fmt: skip
    autocast = spec["precision"] == "bfloat16"

    def step(number: int) -> float:
        batch = rows.batch(order.step(number))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(number, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=batch["tokens"], labels=batch["labels"], shift_labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step(number) for number in range(spec["warmup"])]
    started = time.perf_counter()
    losses += [step(number) for number in range(spec["warmup"], settings.steps)]
    return {"tokens_per_s": BATCH * SEQ_LEN * spec["steps"] / (time.perf_counter() - started), "losses": losses}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    result = (run_attendo if spec["engine"] == "attendo" else run_transformers)(spec)
    from attendo.bench.worker import _peak_rss_mb

    return {**result, "peak_rss_mb": _peak_rss_mb()}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['engine']} worker failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peers_of(name: str) -> list[str]:
    """The transformers variants an attendo variant is compared with: eager at the same precision
    (the aim), and a compiled attendo also with compiled transformers."""
    _, precision, compiled = VARIANTS[name]
    compiled_peers = [f"transformers {precision} compiled", f"transformers {precision} compiled (eager attention)"]
    return [f"transformers {precision}"] + (compiled_peers if compiled else [])


def measure(threads: int, rounds: int, steps: int, warmup: int, variants: list[str]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as shared:
        prepare(Path(shared))
        for round_number in range(rounds):
            for name in variants if round_number % 2 == 0 else variants[::-1]:
                engine, precision, compiled = VARIANTS[name]
                spec = {"name": name, "engine": engine, "precision": precision, "compiled": compiled, "threads": threads,
                        "steps": steps, "warmup": warmup, "shared": shared}  # fmt: skip
                runs[name].append(run_worker(spec))
                print(f"round {round_number + 1}, {name}: {runs[name][-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    results = {n: {k: _spread([r[k] for r in runs[n]]) for k in ("tokens_per_s", "peak_rss_mb")} for n in variants}
    ratios = {}
    for name in variants:
        for peer in peers_of(name) if VARIANTS[name][0] == "attendo" else []:
            if peer in runs:
                per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name], runs[peer])]
                ratios[f"{name} / {peer}"] = _spread(per_round)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "torch": torch.__version__},
        "workload": {"preset": PRESET, "batch": BATCH, "seq_len": SEQ_LEN, "vocab": VOCAB, "threads": threads,
                     "steps": steps, "warmup": warmup},  # fmt: skip
        "rounds": rounds,
        "results": results,
        "ratios": ratios,
        "raw": runs,
    }  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    w, raw = report["workload"], report["raw"]
    lines = [
        f"training speed, {w['preset']}, batch {w['batch']} x {w['seq_len']} tokens, {w['threads']} threads, "
        f"{w['steps']} timed steps after {w['warmup']}, median (min-max) of {report['rounds']} rounds",
        f"{describe(report['machine'])}; torch {report['machine']['torch']}",
        f"{'variant':<48}{'tokens/s':>26}{'peak MB':>10}{'loss, step 1':>14}{'last step':>11}",
    ]
    for name, result in report["results"].items():
        t, m = result["tokens_per_s"], result["peak_rss_mb"]
        losses = raw[name][0]["losses"]
        lines.append(
            f"{name:<48}{t['median']:>10,.0f} ({t['min']:,.0f}-{t['max']:,.0f}){m['median']:>10,.0f}"
            f"{losses[0]:>14.5f}{losses[-1]:>11.4f}"
        )
    lines += [f"{name}: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" for name, r in report["ratios"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="every variant runs once per round")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per process")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (compiling happens there)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/train.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    report = measure(args.threads, args.rounds, args.steps, args.warmup, variants)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
