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
mypy -p batchscope  # the three folders, through batchscope/'s links, under their installed names
# Two test files at a time: most tests wait on the processes they start (a sweep, its workers,
# a server), so the two cores are busier this way (15 min serial → about 10 under load).
python -m pytest -q -n "${BATCHSCOPE_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
