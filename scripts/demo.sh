#!/usr/bin/env bash
# Installs batchscope in ./.venv (CPU PyTorch) and runs the demo sweep to its end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU PyTorch unless one is installed already; on a GPU machine install the CUDA build of torch first.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
batchscope sweep sweeps/configs/mnist1d_demo.yaml "$@"
