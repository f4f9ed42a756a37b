"""The GPU table: run on a machine with CUDA (`python -m benchmarks.gpu`).

Checks what the CUDA path promises: device-resident data, no per-step host sync
(counted with torch.cuda.set_sync_debug_mode), AMP in bf16/fp16, and the
throughput ratio against a bare loop in the same process. Uses an in-memory sink
so it needs neither MLflow nor a database on the GPU machine.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.overhead import measure, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp16,fp32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for GPU machines (python -m benchmarks for CPU)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    for precision in args.precisions.split(","):
        rows = measure(steps=args.steps, device="cuda", precision=precision, tracking="memory", repeats=args.repeats)
        print(f"\n### MNIST-1D MLP, {precision}, {args.steps} steps, eval every 50, log every 10\n")
        print(table(rows))


if __name__ == "__main__":
    main()
