"""Run the engines side by side and print the table (`attendo bench`, benchmarks/bench_engine.py)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attendo.bench.hardware import matmul_gflops, memory_bandwidth_gbs, vector_flags
from attendo.bench.workload import Workload
from attendo.errors import InvalidSettingError

# The configuration peers are compared with: the weights as loaded (a GGUF file's own blocks)
# and a compiled decode step.
REFERENCE = "attendo --fast"

# label, and whether higher is better (None: a property, not a speed, so no ratio).
METRICS = {
    "load_s": ("cold load (s)", False),
    "prefill_tps": ("prefill tok/s", True),
    "decode_tps": ("decode tok/s, batch 1", True),
    "batch_tps": ("decode tok/s, batch 8 total", True),
    "peak_rss_mb": ("peak memory (MB)", False),
    "runtime_rss_mb": ("of which runtime before loading (MB)", None),
    "perplexity": ("perplexity of the 512-token prompt", None),
}


def run_worker(engine: str, path: str, work: Workload, options: dict[str, Any]) -> dict[str, Any]:
    spec = json.dumps({"path": path, "workload": work.to_dict(), "options": options})
    env = {**os.environ, "OMP_NUM_THREADS": str(work.threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "attendo.bench.worker", engine, spec], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} worker failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_available(engine: str) -> str | None:
    """None when the engine's package is importable, else why not."""
    module = {"transformers": "transformers", "llama.cpp": "llama_cpp"}.get(engine)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        hint = "bash benchmarks/setup-peers.sh" if engine == "llama.cpp" else "pip install transformers accelerate"
        return f"{module} is not installed ({hint})"
    return None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    summary = {}
    for key in METRICS:
        values = [r[key] for r in runs if r.get(key) is not None]
        summary[key] = (
            {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
        )
    return summary


def measure(
    model_path: str, engines: list[str], repeats: int, work: Workload, options: dict[str, Any]
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for _ in range(repeats):  # interleaved: every engine once per round
        for engine in engines:
            runs[engine].append(run_worker(engine, model_path, work, options if engine.startswith("attendo") else {}))
    return {
        "model": model_path,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu": _cpu_name(),
            "cpu_flags": vector_flags(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "memory_bandwidth_gbs": memory_bandwidth_gbs(work.threads),
            "matmul_gflops": matmul_gflops(work.threads),
        },
        "workload": work.to_dict(),
        "repeats": repeats,
        "results": {engine: summarize(r) for engine, r in runs.items()},
        "raw": runs,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(report: dict[str, Any]) -> str:
    """A markdown table: each engine's median (min-max), and each peer as a ratio to attendo."""
    engines = list(report["results"])
    reference = REFERENCE if REFERENCE in report["results"] else engines[0]
    ours = report["results"].get(reference)
    header = "| metric | " + " | ".join(engines) + " |"
    lines = [header, "|" + "---|" * (len(engines) + 1)]
    for key, (label, higher_is_better) in METRICS.items():
        cells = []
        for engine in engines:
            value = report["results"][engine][key]
            if value is None:
                cells.append("n/a")
                continue
            cell = f"{value['median']:.3g} ({value['min']:.3g}-{value['max']:.3g})"
            if not engine.startswith("attendo") and ours and ours[key] and higher_is_better is not None:
                ratio = ours[key]["median"] / value["median"] if higher_is_better else value["median"] / ours[key]["median"]
                cell += f", attendo {ratio:.2f}x"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    m = report["machine"]
    lines.append("")
    lines.append(
        f"Machine: {m['cpu']} ({m['cpu_flags']}), {m['cores']} cores, {report['workload']['threads']} threads per engine; "
        f"measured copy bandwidth {m['memory_bandwidth_gbs']:.1f} GB/s, float32 matmul {m['matmul_gflops']:.0f} GFLOP/s. "
        f"Median (min-max) of {report['repeats']} interleaved runs; 'attendo Nx' = {reference}'s speed over the peer's "
        "(memory and load time: the peer's over attendo's)."
    )
    raw = report["raw"].get(reference, [{}])[0]
    if ours and raw.get("weight_bytes_per_token"):
        decode_bound = m["memory_bandwidth_gbs"] * 1e9 / raw["weight_bytes_per_token"]
        prefill_bound = m["matmul_gflops"] * 1e9 / (2 * raw["parameters"])
        lines.append(
            f"Bounds for {reference}'s weight format ({raw['weight_bytes_per_token'] / 1e6:.0f} MB read per decode step, "
            f"{raw['parameters'] / 1e6:.0f}M parameters): decode <= {decode_bound:.0f} tok/s "
            f"(reached {ours['decode_tps']['median'] / decode_bound:.0%}), prefill <= {prefill_bound:.0f} tok/s "
            f"(reached {ours['prefill_tps']['median'] / prefill_bound:.0%})."
        )
    return "\n".join(lines)


def main(
    model: str,
    against: list[str],
    repeats: int,
    options: dict[str, Any],
    out: Path | None,
    also: Sequence[str] = (),
    ours: Sequence[str] = ("attendo", "attendo float32", REFERENCE),
) -> str:
    """Measure attendo and the available peers; returns the table (and writes JSON to out).
    also: more weight formats for the fast path to measure beside the file's own (int8, int4,
    float16, bfloat16). ours: the attendo configurations to measure (see worker.ENGINES)."""
    from attendo.bench.worker import ENGINES
    from attendo.registry import resolve

    unknown = [engine for engine in ours if engine not in ENGINES or not engine.startswith("attendo")]
    if unknown:
        known = ", ".join(e for e in ENGINES if e.startswith("attendo"))
        raise InvalidSettingError(f"unknown attendo engine {unknown[0]!r} (known: {known})")
    path = str(resolve(model))
    engines = [*ours, *(f"{REFERENCE} {weights}" for weights in also)]
    skipped = []
    for peer in against:
        reason = engine_available(peer)
        if reason:
            skipped.append(f"{peer} skipped: {reason}")
        else:
            engines.append(peer)
    report = measure(path, engines, repeats, Workload(), options)
    report["skipped"] = skipped
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return "\n".join([format_table(report), *skipped])
