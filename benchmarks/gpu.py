"""The GPU table: run on a machine with CUDA (`python -m benchmarks.gpu`, or `python -m benchmarks --only gpu`).

Checks what the CUDA path promises: device-resident data, no per-step host sync
(counted with torch.cuda.set_sync_debug_mode), AMP in bf16/fp16, and the
throughput ratio against a bare loop in the same process. Uses an in-memory sink
so it needs neither MLflow nor a database on the GPU machine.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Section
from benchmarks.overhead import measure, table

TITLE = "6. GPU path: batchscope against a bare loop on CUDA"


def gpu_section(quick: bool) -> Section:
    if not torch.cuda.is_available():
        return Section(
            name="gpu",
            title=TITLE,
            target="samples/s ratio to the bare loop, no host sync per step",
            verdict="skipped (no CUDA device here)",
            notes=[
                "Run `python -m benchmarks --only gpu` (or `python -m benchmarks.gpu`) on a CUDA machine; the "
                "H100 results and what the CUDA path does are in “The GPU path” below."
            ],
        )
    steps, repeats = (300, 2) if quick else (600, 3)
    rows = measure(steps=steps, device="cuda", precision="bf16", tracking="memory", repeats=repeats)
    worst = min(r.ratio for r in rows)
    syncs = max(r.syncs_per_step or 0.0 for r in rows)
    return Section(
        name="gpu",
        title=TITLE,
        target="samples/s ratio to the bare loop, no host sync per step",
        verdict=f"lowest ratio {worst:.2f}, at most {syncs:.3f} host syncs per step",
        tables=[table(rows)],
        notes=[
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; MNIST-1D MLP, "
            f"bf16, {steps} steps, eval every 50, log every 10, in-memory sink, median of {repeats} repeats.",
            "Noise-scale cost = time with the noise scale on / off − 1 (at its default cadence).",
        ],
    )


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
