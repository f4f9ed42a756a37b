#!/usr/bin/env bash
# Sets up ./.venv (CPU PyTorch, batchscope with its dev extra) if needed, then runs lint, types and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch first (from local disk); an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Headless Chromium for the report's browser test (Debian's package; skipped where apt-get is not ours to use).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
fi
ruff check .
mypy sweeps trainers analysis
python -m pytest -q --durations=15 "$@"
