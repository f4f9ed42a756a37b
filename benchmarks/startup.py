"""Start-up and per-trial overhead of `batchscope sweep`, measured from outside and from the stores.

The real command is launched as a subprocess on a fresh store (BATCHSCOPE_ROOT in a
temporary folder, the MNIST-1D data cache as it is). Afterwards the stores say when
everything happened: the sweep's parent run and each trial's run were created
(`start_time`), each trial's `train/loss` reached the sink (its metric
timestamps, one row per flush of `log_every` steps) and the run ended (`end_time`).

- start-up = first training step of the first trial − the moment the process was launched;
- per-trial gap = next trial's first step − the previous trial's run `end_time`
  (also given from the previous trial's last logged loss, which adds its end-of-run
  measurements).

The first step's time is the first flush's timestamp less the (flush's last step − 1)
steps before it, at the step time the run itself logged (`perf/step_time_ms`).

Then the start-up is broken down: `python -X importtime` for the imports of the sweep
process and of its worker, and benchmarks/startup_probe.py for the phases in order.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO, Section, markdown_table

STUDY = "startup"
START_UP_TARGET_S = 5.0
GAP_TARGET_S = 0.5


def config_text(n_trials: int) -> str:
    # The product's defaults (noise scale, sharpness, checkpoints, TPE) on a small, fast model.
    return f"""
study: {STUDY}
trainer: {{recipe: mnist1d, model: mlp, num_samples: 5000}}
train: {{max_steps: 100, eval_every: 50}}
search:
  batch_size: {{values: [32, 64, 128, 256]}}
  lr: {{low: 0.01, high: 0.3, log: true}}
  n_trials: {n_trials}
report: {{auto: false}}
"""


@dataclass
class TrialTimes:
    """Seconds since the epoch, read back from MLflow."""

    run_start: float
    first_step: float
    last_loss: float
    end: float


@dataclass
class Launch:
    launched: float
    exited: float
    parent_start: float
    trials: list[TrialTimes]
    returncode: int

    def first_step(self) -> float:
        return self.trials[0].first_step - self.launched

    def gaps(self) -> list[float]:
        return [b.first_step - a.end for a, b in zip(self.trials, self.trials[1:], strict=False)]


def batchscope_command() -> list[str]:
    script = Path(sys.executable).parent / "batchscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchscope.sweeps.cli"]


def subprocess_env(root: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if root is not None:
        env["BATCHSCOPE_ROOT"] = str(root)
    return env


def launch_sweep(tmp: Path, n_trials: int) -> Launch:
    config = tmp / "startup.yaml"
    config.write_text(config_text(n_trials))
    root = tmp / "store"
    launched = time.time()
    proc = subprocess.run(
        [*batchscope_command(), "sweep", str(config), "--no-report"],
        cwd=tmp,
        env=subprocess_env(root),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"batchscope sweep exited with {proc.returncode}: {proc.stderr[-2000:]}")
    parent_start, trials = read_times(root)
    return Launch(launched, exited, parent_start, trials, proc.returncode)


def read_times(root: Path) -> tuple[float, list[TrialTimes]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None, "the sweep created no MLflow experiment"
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("batchscope.role") == "sweep")
    trials = []
    for run in runs:
        if run.data.tags.get("batchscope.role") != "trial":
            continue
        losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
        if not losses:
            continue
        step_ms = client.get_metric_history(run.info.run_id, "perf/step_time_ms")
        ms = min(step_ms, key=lambda m: m.step).value if step_ms else 0.0
        first_ts = losses[0].timestamp
        # The first flush's last step: one row per logging window by default, a row per step
        # with train.log_every_step (all at the flush's time at the start of a run).
        flushed = max(m.step for m in losses if m.timestamp <= first_ts + 2)
        trials.append(
            TrialTimes(
                run_start=run.info.start_time / 1000,
                first_step=(first_ts - (flushed - 1) * ms) / 1000,
                last_loss=max(m.timestamp for m in losses) / 1000,
                end=(run.info.end_time or 0) / 1000,
            )
        )
    return parent.info.start_time / 1000, trials


def import_profile(code: str) -> tuple[float, dict[str, float]]:
    """Total import seconds of `code` in a fresh interpreter, and the self time per top-level package."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    per_package: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        per_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    return sum(per_package.values()), dict(per_package)


SWEEP_IMPORTS = (
    "import batchscope.sweeps.cli, batchscope.sweeps.commands, batchscope.sweeps.config, "
    "batchscope.sweeps.runner, batchscope.sweeps.progress"
)
WORKER_IMPORTS = (
    "import batchscope.sweeps.worker, batchscope.sweeps.faults, batchscope.sweeps.sink, "
    "batchscope.sweeps.store_setup, batchscope.trainers.loop"
)


def probe(tmp: Path) -> list[tuple[str, str, float, float]]:
    config = tmp / "probe.yaml"
    config.write_text(config_text(1))
    launched = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.startup_probe", str(config), repr(launched)],
        cwd=tmp,
        env=subprocess_env(tmp / "probe-store"),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    phases: list[tuple[str, str, float, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return sorted(phases, key=lambda p: p[2])


def cold_data_seconds() -> float:
    """Generating the MNIST-1D data (5,000 examples) with an empty cache: a machine's first sweep only."""
    with tempfile.TemporaryDirectory() as cache:
        code = (
            "import time; t = time.perf_counter(); "
            "from batchscope.trainers.recipes.mnist1d import Mnist1dOptions, make_arrays; "
            "make_arrays(Mnist1dOptions(num_samples=5000)); print(time.perf_counter() - t)"
        )
        env = subprocess_env() | {"BATCHSCOPE_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def cold_store_seconds() -> float:
    """Making the cached empty MLflow store (MLflow's migrations): once per MLflow version on a machine."""
    with tempfile.TemporaryDirectory() as cache:
        code = (
            "import time; import mlflow.store.db.utils; from batchscope.sweeps.store_setup import empty_store; "
            "t = time.perf_counter(); empty_store(); print(time.perf_counter() - t)"
        )
        env = subprocess_env() | {"BATCHSCOPE_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def _s(x: float) -> str:
    return f"{x:.2f} s"


def startup_section(quick: bool) -> Section:
    launches, n_trials = (1, 4) if quick else (2, 6)
    with tempfile.TemporaryDirectory(prefix="batchscope-startup-") as tmp:
        runs = []
        for i in range(launches):
            folder = Path(tmp) / f"launch-{i}"
            folder.mkdir()
            runs.append(launch_sweep(folder, n_trials))
        phases = probe(Path(tmp))
    sweep_total, sweep_packages = import_profile(SWEEP_IMPORTS)
    worker_total, worker_packages = import_profile(WORKER_IMPORTS)
    cold = None if quick else cold_data_seconds()
    cold_store = None if quick else cold_store_seconds()

    columns = [f"launch {i + 1}" for i in range(launches)]
    rows: list[tuple[str, ...]] = []

    def row(label: str, values: list[float], target: str = "") -> None:
        rows.append((label, *(_s(v) for v in values), target))

    row("**start-up: launch → first training step**", [r.first_step() for r in runs], f"{START_UP_TARGET_S:.0f} s")
    row("  launch → sweep's MLflow run created", [r.parent_start - r.launched for r in runs])
    row("  → first trial's run created", [r.trials[0].run_start - r.parent_start for r in runs])
    row("  → first trial's first step", [r.trials[0].first_step - r.trials[0].run_start for r in runs])
    row(
        f"**per-trial gap: run ended → next trial's first step** (median of {n_trials - 1})",
        [statistics.median(r.gaps()) for r in runs],
        f"{GAP_TARGET_S} s",
    )
    row("  the largest of those gaps", [max(r.gaps()) for r in runs])
    row(
        "  run ended → next trial's run created",
        [statistics.median(b.run_start - a.end for a, b in zip(r.trials, r.trials[1:], strict=False)) for r in runs],
    )
    row(
        "  next run created → its first step",
        [statistics.median(t.first_step - t.run_start for t in r.trials[1:]) for r in runs],
    )
    row(
        "end of a trial: last loss logged → run ended (median)",
        [statistics.median(t.end - t.last_loss for t in r.trials) for r in runs],
    )
    row(
        "gap from the last loss logged → next trial's first step (median)",
        [
            statistics.median(b.first_step - a.last_loss for a, b in zip(r.trials, r.trials[1:], strict=False))
            for r in runs
        ],
    )
    row("last run ended → process exit", [r.exited - r.trials[-1].end for r in runs])
    row("whole command (wall)", [r.exited - r.launched for r in runs])
    measured = markdown_table(["measure", *columns, "target"], rows, "l" + "r" * (launches + 1))

    phase_rows = [(process, name, f"{a:.2f}", f"{b:.2f}", _s(b - a)) for process, name, a, b in phases]
    phase_table = markdown_table(
        ["process", "phase (benchmarks/startup_probe.py)", "from, s after launch", "to", "takes"], phase_rows, "llrrr"
    )

    def top(packages: dict[str, float], n: int = 7) -> str:
        best = sorted(packages.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {seconds:.2f}" for name, seconds in best)

    import_rows = [
        ("sweep process: " + SWEEP_IMPORTS.removeprefix("import "), _s(sweep_total), top(sweep_packages)),
        ("worker process: " + WORKER_IMPORTS, _s(worker_total), top(worker_packages)),
    ]
    import_table = markdown_table(["imports (`python -X importtime`)", "total", "largest, s (self time)"], import_rows)

    worst_start = max(r.first_step() for r in runs)
    worst_gap = max(max(r.gaps()) for r in runs)  # every gap, the first included (it once imported torch)
    verdicts = []
    verdicts.append(
        f"start-up {'met' if worst_start <= START_UP_TARGET_S else 'missed'} ({worst_start:.1f} s)",
    )
    verdicts.append(f"per-trial gap {'met' if worst_gap <= GAP_TARGET_S else 'missed'} (largest {worst_gap:.2f} s)")
    notes = [
        f"`batchscope sweep` of {n_trials} trials × 100 steps (MNIST-1D MLP, batch 32–256, eval every 50, the "
        "product's defaults otherwise: TPE, noise scale, sharpness, checkpoints), fresh store each launch, "
        "the data cache warm.",
        "A trial's first step is estimated from its first flush of per-step losses (every `log_every` steps) "
        "and its logged step time; the gap splits at the next trial's MLflow run creation.",
    ]
    if cold is not None:
        notes.append(
            f"A machine's very first sweep also generates the MNIST-1D data: {cold:.1f} s for 5,000 examples "
            "with an empty cache (cached afterwards)."
        )
    if cold_store is not None:
        notes.append(
            f"A new store is a copy of an empty MLflow database cached per MLflow version; a machine's first "
            f"sweep with an MLflow version makes it first (MLflow's migrations): {cold_store:.1f} s."
        )
    return Section(
        name="startup",
        title="3. Start-up and per-trial overhead of `batchscope sweep`",
        target=f"first training step within {START_UP_TARGET_S:.0f} s of launch; ≤ {GAP_TARGET_S} s between trials",
        verdict=", ".join(verdicts),
        tables=[measured, phase_table, import_table],
        notes=notes,
    )
