"""Prefill, decode and batch throughput, load time and memory: attendo beside its peers.

    .venv/bin/python benchmarks/bench_engine.py [--model M] [--against transformers,llama.cpp] [--repeats 3]

The same as `attendo bench`. llama.cpp needs `bash benchmarks/setup-peers.sh` first.
"""

import sys

from attendo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
