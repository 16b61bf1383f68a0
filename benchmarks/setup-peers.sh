#!/usr/bin/env bash
# Install the peer engines the benchmarks compare against (never part of the main install).
# llama-cpp-python compiles llama.cpp from source: a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh --test
.venv/bin/python -c "import llama_cpp" 2>/dev/null || \
  CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    "llama-cpp-python==0.3.36" diskcache
.venv/bin/python -c "import transformers, accelerate" 2>/dev/null || \
  .venv/bin/python -m pip install --quiet --disable-pip-version-check transformers accelerate
