"""What a change costs or gains: attendo's default load at another commit beside the working tree's,
interleaved in one run, with the same workload as `attendo bench` (and llama.cpp beside them when
it is installed).

    .venv/bin/python benchmarks/bench_commits.py 88c3877 [--model M] [--repeats 2] [--fast]

The other commit's ``src/`` is exported with ``git archive`` to a temporary directory and put first
on the worker processes' PYTHONPATH; everything else (the venv, the workload) is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

from attendo.bench.hardware import vector_flags
from attendo.bench.run import engine_available, run_worker
from attendo.bench.workload import Workload
from attendo.registry import resolve

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("prefill_tps", "decode_tps", "batch_tps")


def export_source(commit: str, into: Path) -> Path:
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the commit to compare the working tree with")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="compare the compiled --fast engines instead")
    args = parser.parse_args()
    engine = "attendo --fast" if args.fast else "attendo"
    path, work = str(resolve(args.model)), Workload()
    with tempfile.TemporaryDirectory() as scratch:
        older = export_source(args.commit, Path(scratch))
        runs: dict[str, list[dict]] = {args.commit: [], "working tree": []}
        if engine_available("llama.cpp") is None:
            runs["llama.cpp"] = []
        for _ in range(args.repeats):
            for name in runs:
                saved = os.environ.get("PYTHONPATH")
                if name == args.commit:
                    os.environ["PYTHONPATH"] = str(older)
                try:
                    runs[name].append(run_worker(engine if name != "llama.cpp" else name, path, work, {}))
                finally:
                    os.environ.pop("PYTHONPATH", None)
                    if saved is not None:
                        os.environ["PYTHONPATH"] = saved
    print(f"{engine}, {args.model}, {args.repeats} interleaved rounds, CPU: {vector_flags()}")
    for name, results in runs.items():
        medians = {m: round(statistics.median(r[m] for r in results), 1) for m in METRICS if results[0].get(m)}
        print(f"{name:>14}: " + ", ".join(f"{m} {v}" for m, v in medians.items()))
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
