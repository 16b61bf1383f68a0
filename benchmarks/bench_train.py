"""Training speed: `attendo train` beside a plain transformers training loop, in one run.

    .venv/bin/python benchmarks/bench_train.py [--threads 2] [--repeats 2] [--steps 12] [--warmup 3]

The same tiny LLaMA (the llama-mini preset: dim 256, 4 layers, 4 query and 2 key/value heads,
SwiGLU 688, a 4096-token vocabulary tied to the head, about 4M parameters), the same batch (8
sequences of 256 tokens), AdamW with the same hyperparameters, gradient clipping at 1, the same
thread count:

- attendo: `attendo train` itself (attendo.train.pretrain on a generated text corpus, no
  evaluation or checkpoint inside the timed steps), in its default precision here (bfloat16
  autocast where the CPU has AVX512-BF16 or AMX, else float32), in float32, and with
  --compile (a compiled training step);
- transformers: LlamaForCausalLM built from the same config (its default SDPA attention), a loop
  of forward with labels, backward, clip, AdamW step; in float32 and under the same bfloat16
  autocast.

Each variant runs in its own process, the variants take turns (every one once per repeat); a
process times --steps optimizer steps after --warmup untimed ones (compiling happens there). The
report: training tokens per second (median and range over repeats), peak memory of the process,
and attendo's speed over transformers' at the same precision. JSON to --out
(default benchmarks/results/train.json).
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

# (engine, precision, compiled)
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "attendo": ("attendo", "auto", False),
    "attendo float32": ("attendo", "float32", False),
    "attendo --compile": ("attendo", "auto", True),
    "transformers float32": ("transformers", "float32", False),
    "transformers bfloat16": ("transformers", "bfloat16", False),
}
BATCH, SEQ_LEN, VOCAB = 8, 256, 4096
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _corpus(folder: Path) -> Path:
    """Enough generated English-like text for every step to see new rows."""
    import random

    from attendo.bench.workload import PASSAGE

    words = PASSAGE.split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(4000)]
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def run_attendo(spec: dict[str, Any]) -> dict[str, Any]:
    from attendo.train.pretrain import pretrain
    from attendo.train.report import read_log
    from attendo.train.settings import TrainSettings

    with tempfile.TemporaryDirectory() as scratch:
        steps = spec["warmup"] + spec["steps"]
        settings = TrainSettings(
            steps=steps, batch_size=BATCH, lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1],
            weight_decay=HYPER["weight_decay"], eval_every=10**6, save_every=10**6, precision=spec["precision"],
            compile=spec["compiled"],
        )  # fmt: skip
        out = Path(scratch) / "run"
        pretrain([_corpus(Path(scratch))], out, settings, preset_name="llama-mini", seq_len=SEQ_LEN,
                 vocab_size=VOCAB, eval_fraction=0.0)  # fmt: skip
        timed = read_log(out)[spec["warmup"] :]
        seconds = timed[-1]["elapsed"] - read_log(out)[spec["warmup"] - 1]["elapsed"]
    return {"tokens_per_s": BATCH * SEQ_LEN * len(timed) / seconds}


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attendo.presets import preset

    mini = preset("llama-mini")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=mini.dim, intermediate_size=mini.ffn_dim, num_hidden_layers=mini.n_layers,
        num_attention_heads=mini.n_heads, num_key_value_heads=mini.n_kv_heads, max_position_embeddings=SEQ_LEN,
        rms_norm_eps=mini.norm_eps, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    generator = torch.Generator().manual_seed(0)
    autocast = spec["precision"] == "bfloat16"

    def step() -> None:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    return {"tokens_per_s": BATCH * SEQ_LEN * spec["steps"] / (time.perf_counter() - started)}


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


def measure(threads: int, repeats: int, steps: int, warmup: int, variants: list[str]) -> dict[str, Any]:

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for name in variants:
            engine, precision, compiled = VARIANTS[name]
            spec = {"engine": engine, "precision": precision, "compiled": compiled, "threads": threads,
                    "steps": steps, "warmup": warmup}  # fmt: skip
            runs[name].append(run_worker(spec))
            print(f"{name}: {runs[name][-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    results = {n: {k: _spread([r[k] for r in runs[n]]) for k in ("tokens_per_s", "peak_rss_mb")} for n in variants}
    speed = {n: results[n]["tokens_per_s"]["median"] for n in variants}
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    ratios = {}
    for name in variants:
        engine, precision, _ = VARIANTS[name]
        if engine != "attendo":
            continue
        bf16 = precision == "bfloat16" or (precision == "auto" and (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")))
        peer = "transformers bfloat16" if bf16 else "transformers float32"
        if peer in speed:
            ratios[f"{name} / {peer}"] = speed[name] / speed[peer]
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "torch": torch.__version__},
        "workload": {"batch": BATCH, "seq_len": SEQ_LEN, "vocab": VOCAB, "threads": threads, "steps": steps, "warmup": warmup},
        "repeats": repeats,
        "results": results,
        "ratios": ratios,
        "raw": runs,
    }  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"training speed, llama-mini, batch {w['batch']} x {w['seq_len']} tokens, {w['threads']} threads, "
        f"{w['steps']} timed steps after {w['warmup']}, median (min-max) of {report['repeats']} runs",
        f"{describe(report['machine'])}; torch {report['machine']['torch']}",
        f"{'variant':<24}{'tokens/s':>28}{'peak MB':>12}",
    ]
    for name, result in report["results"].items():
        t, m = result["tokens_per_s"], result["peak_rss_mb"]
        lines.append(f"{name:<24}{t['median']:>10,.0f} ({t['min']:,.0f}-{t['max']:,.0f}){m['median']:>12,.0f}")
    lines += [f"{name}: {ratio:.2f}x" for name, ratio in report["ratios"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens there)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
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
    report = measure(args.threads, args.repeats, args.steps, args.warmup, variants)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
