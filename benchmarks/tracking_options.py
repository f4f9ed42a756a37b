"""Two ways past target 1's gap at batch 16 and 128 that were tried and measured (not adopted).

    python -m benchmarks.tracking_options [--quick] [--threads N]

Not part of `python -m benchmarks`: it records why two obvious ideas do not help, with the
numbers, side by side in one run like every other section.

1. **Evaluating off the critical path.** The bare loop plus the evaluation every 50 steps,
   (a) in the loop, as batchscope and a hand-written loop do it, against (b) in a background
   thread on a snapshot of the weights (copied at the evaluation step, result collected 10
   steps later: the next logging point). On a 2-core machine (b) could overlap the two.
2. **Handing rows to the writer more often** (`MlflowSink(flush_s=...)`): a run ends once the
   writer has written its last rows, so a shorter interval shortens that wait, but the writer
   then works more often during training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from batchscope.trainers.evaluation import evaluate
from batchscope.trainers.loop import train
from batchscope.trainers.spec import TrainSpec
from benchmarks.bare import bare_loop, build
from benchmarks.common import Timing, markdown_table
from benchmarks.overhead import MlflowStore, alternate, bare_variant, base_spec, paired, timed_train

BATCH_SIZES = (16, 128)
FLUSH_INTERVALS = (0.25, 0.1, 0.05, 0.02)  # 0.25 s is MlflowSink's default


def eval_variant(spec: TrainSpec, overlap: bool) -> Callable[[], Timing]:
    """The bare loop with the validation set evaluated every `eval_every` steps, in line or in a thread."""

    def run() -> Timing:
        task = build(spec)
        shadow = copy.deepcopy(task.model)
        live, copies = list(task.model.state_dict().values()), list(shadow.state_dict().values())
        shadow_task = replace(task, model=shadow)
        pool = ThreadPoolExecutor(max_workers=1)
        pending: list[Future[dict[str, float]]] = []

        def on_step(step: int, loss: torch.Tensor) -> None:
            if pending and step % spec.log_every == 0:
                pending.pop().result()  # the next logging point: the sweep would report it now
            if step % spec.eval_every:
                return
            if not overlap:
                evaluate(task, task.val_x, task.val_y, contextlib.nullcontext)
                return
            torch._foreach_copy_(copies, live)  # the weights at this step
            pending.append(pool.submit(evaluate, shadow_task, task.val_x, task.val_y, contextlib.nullcontext))

        try:
            timing = bare_loop(spec, task, spec.max_steps, on_step)
            for f in pending:
                f.result()
            return timing
        finally:
            pool.shutdown()

    return run


def overlap_table(steps: int, repeats: int) -> str:
    base = base_spec(steps)
    rows = []
    for b in BATCH_SIZES:
        spec = replace(base, batch_size=b)
        variants = {
            "bare": bare_variant(spec),
            "inline": eval_variant(spec, overlap=False),
            "thread": eval_variant(spec, overlap=True),
        }
        times = alternate(variants, repeats)
        rows.append((f"batch {b}", paired(times, "bare", "inline").text(3), paired(times, "bare", "thread").text(3)))
    return markdown_table(
        ["samples/s ratio to the bare loop", "evaluation in the loop", "evaluation in a thread, on a weight snapshot"],
        rows,
        "lrr",
    )


def flush_table(steps: int, repeats: int) -> str:
    from batchscope.sweeps.sink import MlflowSink
    from batchscope.sweeps.worker import PipeTransport

    base = base_spec(steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = MlflowStore(Path(tmp))
        timed_train(replace(base, max_steps=30), store.sink())  # process-wide warm-up

        def sink(flush_s: float) -> Any:
            run_id = store.client.create_run(store.experiment_id).info.run_id

            class Hosted(MlflowSink):
                def close(self, timeout: float = 120.0) -> None:
                    super().close(timeout)
                    store.drain(run_id)

            return Hosted(PipeTransport(store._conn), run_id, flush_s=flush_s)

        for b in BATCH_SIZES:
            spec = replace(base, batch_size=b)
            parts: dict[str, list[tuple[float, float, float]]] = {str(f): [] for f in FLUSH_INTERVALS}

            def variant(
                flush_s: float, spec: TrainSpec = spec, parts: dict[str, list[tuple[float, float, float]]] = parts
            ) -> Callable[[], Timing]:
                def run() -> Timing:
                    task, s = build(spec), sink(flush_s)
                    cpu0, wall0 = store.writer_cpu_s, time.perf_counter()
                    train(spec, s, task=task)
                    wall1 = time.perf_counter()
                    s.close()
                    wall2 = time.perf_counter()
                    parts[str(flush_s)].append((wall1 - wall0, wall2 - wall1, store.writer_cpu_s - cpu0))
                    return Timing(wall2 - wall0, 0.0)

                return run

            variants: dict[str, Callable[[], Timing]] = {"bare": bare_variant(spec)}
            variants |= {str(f): variant(f) for f in FLUSH_INTERVALS}
            times = alternate(variants, repeats)
            for f in FLUSH_INTERVALS:
                key = str(f)
                med = [1000 * statistics.median(p[i] for p in parts[key]) for i in range(3)]
                rows.append(
                    (
                        f"batch {b}, every {f:g} s" + (" (default)" if f == FLUSH_INTERVALS[0] else ""),
                        f"{med[0]:.0f} ms",
                        f"{med[1]:.1f} ms",
                        f"{med[2]:.0f} ms",
                        paired(times, "bare", key).text(3),
                    )
                )
        store.close()
    return markdown_table(
        [
            "sink hands rows over",
            "train() (median)",
            "then waiting for the writer",
            "writer's CPU per run",
            "samples/s ratio to bare",
        ],
        rows,
        "lrrrr",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracking_options", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200-step runs, 3 repeats (default: 1,000 and 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads here and in child processes")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    steps, repeats = (200, 3) if args.quick else (1000, 9)
    load = os.getloadavg()[0]
    print(f"steps per run: {steps}, repeats: {repeats}, load average {load:.1f}, {os.cpu_count()} cores\n")
    print("1. Evaluating the 1,000 validation examples every 50 steps, in the loop or in a thread:\n")
    print(overlap_table(steps, repeats), "\n", flush=True)
    print("2. batchscope with everything on and an MLflow sink, by how often the sink hands rows over:\n")
    print(flush_table(steps, repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
