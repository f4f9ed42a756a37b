"""Findings you can trust: steps to target against the evaluation cadence, and the in-loop noise scale.

    python -m benchmarks --only findings [--quick]

A. B_crit against the evaluation cadence. Training does not depend on when the loop evaluates
(evaluation runs in eval mode and draws no random numbers; the noise scale and sharpness are
off), so each (batch size, learning rate, seed) of a dense MNIST-1D grid is trained once with an
evaluation at every step, and the runs a sweep with `eval_every = k` would have seen are read off
that curve: the first evaluation at a multiple of k at or above the target (what batchscope
recorded before) and the crossing interpolated between it and the evaluation before it
(`trainers.evaluation.crossing`, what it records now). Per cadence and reading, each batch size's
fastest learning rate is picked and S(B) = S_min (1 + B_crit/B) fitted as the report does
(`analysis.tables.fastest_to_target`, `analysis.fits.fit_critical_batch`), against the reference
read at every step. One real run with `eval_every = 50` checks the reconstruction. The curves
are cached under $BATCHSCOPE_BENCH_CACHE, one file per run, keyed by the trainer code and spec.

B. The loop's noise scale (`gns/b_simple` ± `gns/b_simple_se`, a ratio of means over a window
of steps) along one run at batch 64, against B_simple = tr Σ / |G|² computed exactly over the
whole training set from every example's gradient, on weights copied every 10 steps of each
window (the ratio of the means over the window, as the loop's estimate reads it without
sampling noise); and the old reading (bias-corrected EMAs, β = 0.95, of the same raw
measurements) recomputed from the logged `gns/grad_sq` and `gns/trace_sigma`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscope.trainers.spec import (  # torch-free: the trainers themselves are imported where they run
    RecordingSink,
    Sink,
    TrainSpec,
)
from benchmarks.common import Section, cache_root, code_digest, markdown_table

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from batchscope.trainers.task import LossFn

METRIC, TARGET = "val/acc", 0.6
CADENCES = (5, 25, 50)  # evaluation intervals (steps) read off the every-step curves
RECIPE_OPTIONS: Mapping[str, Any] = {"num_samples": 10_000, "hidden": 256}
MOMENTUM = 0.9
ACCEPTABLE_ERROR = 0.10  # B_crit from interpolated crossings within 10% of the every-step reference
BELIEVABLE_SE = 0.5  # noise-scale reads whose own s.e. is at most half the value are judged against the exact one
COVERAGE = 0.75  # of those, the share where the exact value lies within 2 s.e.


# ---- A: the grid ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Batch sizes × learning rates around each batch size's fastest (found by a first pass), × seeds."""

    batch_sizes: tuple[int, ...]
    lr_offsets: tuple[int, ...]  # rungs of the learning-rate ladder relative to the batch size's centre
    seeds: tuple[int, ...]

    def lrs(self, batch_size: int) -> list[float]:
        return [ladder(LR_CENTRE[batch_size] + k) for k in self.lr_offsets]


def ladder(rung: int) -> float:
    """Learning rates 0.15 decades (×1.41) apart: 0.01, 0.0141, 0.02, 0.0282, ..."""
    return round(0.01 * 10 ** (0.15 * rung), 6)


# Each batch size's fastest learning rate in a first pass (eval every 5, 11 rates 0.2 decades apart),
# as a rung of the ladder: 0.04 at batch 16, rising to 1.26 at 2048. It sits just below the rates
# that no longer train, so the grid takes three rungs below it and two above.
LR_CENTRE = {16: 4, 32: 6, 64: 8, 128: 9, 256: 11, 512: 12, 1024: 13, 2048: 14}
# Steps a run may take: about twice the fastest run's at that batch size, in multiples of 50 (the
# largest cadence); slower learning rates that do not make it are not the fastest anyway.
STEP_BUDGET = {16: 2000, 32: 1200, 64: 800, 128: 500, 256: 300, 512: 200, 1024: 200, 2048: 200}
FULL = Grid(tuple(LR_CENTRE), (-3, -2, -1, 0, 1, 2), (0, 1))
QUICK = Grid((32, 128, 512, 2048), (-1, 0, 1), (0,))


def spec_for(batch_size: int, lr: float, seed: int, eval_every: int = 1) -> TrainSpec:
    return TrainSpec(
        recipe="mnist1d",
        model="mlp",
        recipe_options=dict(RECIPE_OPTIONS),
        batch_size=batch_size,
        lr=lr,
        momentum=MOMENTUM,
        max_steps=STEP_BUDGET[batch_size],
        eval_every=eval_every,
        target_metric=METRIC,
        target_value=TARGET,
        stop_at_target=eval_every > 1,
        seed=seed,
        device="cpu",
        gns=False,  # its cadence decides which steps split their batch: off, training is cadence-free
        sharpness=False,
    )


@dataclass(frozen=True)
class Curve:
    """One run's val/acc at initialization and after every step, until every cadence saw the target."""

    batch_size: int
    lr: float
    seed: int
    initial: float
    acc: tuple[float, ...]  # acc[s - 1]: after step s
    loop_steps_to_target: float | None  # the loop's own interpolated crossing (at every step)
    seconds: float  # wall time of its training, when it was trained


class UntilEveryCadence(Sink):
    """Keeps val/acc; stops the run once, for every cadence, an evaluation at a multiple of it reached the target."""

    def __init__(self) -> None:
        self.initial: float | None = None
        self.acc: list[float] = []
        self.waiting = {1, *CADENCES}

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if step == 0 and METRIC in values:  # the loop's evaluation at initialization
            self.initial = values[METRIC]

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        return None

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        self.acc.append(values[METRIC])
        if values[METRIC] >= TARGET:
            self.waiting -= {k for k in self.waiting if step % k == 0}
        return bool(self.waiting)


def train_curve(job: tuple[int, float, int]) -> dict[str, Any]:
    """Train one configuration with an evaluation at every step (in a worker process)."""
    import torch

    from batchscope.trainers.loop import train

    torch.set_num_threads(1)
    batch_size, lr, seed = job
    sink = UntilEveryCadence()
    started = time.perf_counter()
    result = train(spec_for(batch_size, lr, seed), sink)
    assert sink.initial is not None, "train() logged no evaluation at step 0"
    return {
        "seconds": time.perf_counter() - started,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "initial": sink.initial,
        "acc": sink.acc,
        "loop_steps_to_target": result.final.get("final/steps_to_target"),
    }


def _curve_path(job: tuple[int, float, int]) -> Path:
    """One cache file per run, keyed by what the curve depends on: the trainer code, the spec, the stopping rule."""
    spec = spec_for(*job).to_dict()
    parts = [spec, [TARGET, *CADENCES], code_digest(("trainers",))]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "findings-curves" / f"{key}.json"


def curves(grid: Grid, processes: int = 2) -> tuple[list[Curve], int]:
    """Every run of the grid (cached per run); and how many were trained now."""
    jobs = [(b, lr, s) for b in grid.batch_sizes for lr in grid.lrs(b) for s in grid.seeds]
    missing = [j for j in jobs if not _curve_path(j).exists()]
    if missing:
        missing.sort(key=lambda j: j[0])  # the long small-batch runs first: the pool ends together
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
        with ctx.Pool(processes) as pool:
            for row in pool.imap_unordered(train_curve, missing, chunksize=1):
                path = _curve_path((row["batch_size"], row["lr"], row["seed"]))
                path.parent.mkdir(parents=True, exist_ok=True)
                part = path.with_suffix(".part")  # then renamed: an interrupted run leaves no half file
                part.write_text(json.dumps(row))
                os.replace(part, path)
    out = []
    for job in jobs:
        row = json.loads(_curve_path(job).read_text())
        acc, crossed = tuple(row["acc"]), row["loop_steps_to_target"]
        out.append(Curve(job[0], job[1], job[2], row["initial"], acc, crossed, row["seconds"]))
    return out, len(missing)


# ---- A: reading a curve as a sweep with a given cadence would ------------------------------------


def evaluations(curve: Curve, cadence: int) -> list[tuple[int, float]]:
    """(step, val/acc) at the evaluations of a run with `eval_every = cadence`, the initial one first."""
    return [(0, curve.initial)] + [(s, curve.acc[s - 1]) for s in range(cadence, len(curve.acc) + 1, cadence)]


def first_reach(curve: Curve, cadence: int) -> float | None:
    """The first evaluation at or above the target: what batchscope recorded before the interpolation."""
    return next((float(s) for s, v in evaluations(curve, cadence) if v >= TARGET), None)


def interpolated(curve: Curve, cadence: int) -> float | None:
    """The crossing interpolated between the evaluations around it, as `train()` records it now."""
    from batchscope.trainers.evaluation import crossing

    points = evaluations(curve, cadence)
    if points[0][1] >= TARGET:
        return 0.0
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if v1 >= TARGET:
            return crossing((s0, v0, 0.0), (s1, v1, 0.0), TARGET)[0]
    return None


Reading = Callable[[Curve, int], "float | None"]


@dataclass(frozen=True)
class CritFit:
    """Each batch size's fastest learning rate under one reading, and the fit of S(B) to those runs."""

    fastest: pd.DataFrame  # per batch size: lr and steps (seed mean), as `fastest_to_target` gives them
    b_crit: float
    low: float
    high: float
    s_min: float


def fit(runs: list[Curve], reading: Reading, cadence: int) -> CritFit:
    import numpy as np
    import pandas as pd

    from batchscope.analysis.fits import fit_critical_batch
    from batchscope.analysis.tables import SAMPLES, STEPS, TIME, fastest_to_target

    # Trials numbered by (batch size, lr): the report's stable sort gives ties to the smaller rate.
    trials = {key: i for i, key in enumerate(sorted({(c.batch_size, c.lr) for c in runs}))}
    rows = []
    for i, c in enumerate(runs):
        steps = reading(c, cadence)
        s = np.nan if steps is None else steps
        rows.append(
            {
                "run_id": str(i),
                "trial": trials[(c.batch_size, c.lr)],
                "batch_size": c.batch_size,
                "lr": c.lr,
                "seed": c.seed,
                STEPS: s,
                SAMPLES: s * c.batch_size,
                TIME: np.nan,
            }
        )
    fastest, points = fastest_to_target(pd.DataFrame(rows))
    result = fit_critical_batch(
        points["batch_size"].to_numpy(dtype=float),
        points[STEPS].to_numpy(dtype=float),
        samples_to_target=points[SAMPLES].to_numpy(dtype=float),
    )
    if result is None:
        return CritFit(fastest, math.nan, math.nan, math.nan, math.nan)
    return CritFit(fastest, result.b_crit, result.b_crit_low, result.b_crit_high, result.s_min)


def check_real_run(runs: list[Curve], cadence: int = 50) -> tuple[Curve, float, float]:
    """A real `train()` with `eval_every = cadence` on the run whose two readings differ most: same crossing?"""
    import torch

    from batchscope.trainers.loop import train

    def gap(c: Curve) -> float:
        before, after = first_reach(c, cadence), interpolated(c, cadence)
        return -1.0 if before is None or after is None else before - after

    curve = max(runs, key=gap)
    torch.set_num_threads(1)
    result = train(spec_for(curve.batch_size, curve.lr, curve.seed, cadence), RecordingSink())
    real = result.final["final/steps_to_target"]
    rebuilt = interpolated(curve, cadence)
    assert rebuilt is not None and abs(real - rebuilt) < 1e-6, f"train() says {real}, the reconstruction {rebuilt}"
    return curve, real, rebuilt


def check_every_step(runs: list[Curve]) -> None:
    """Each run's own every-step crossing (logged by train()) is the reconstruction's at cadence 1."""
    for c in runs:
        mine, loops = interpolated(c, 1), c.loop_steps_to_target
        assert (mine is None) == (loops is None), f"{c}: reached in one reading and not the other"
        assert mine is None or loops is None or abs(mine - loops) < 1e-6, f"{c}: {mine} against {loops}"


# ---- A: tables -------------------------------------------------------------------------------


def _interval(f: CritFit) -> str:
    if not math.isfinite(f.b_crit):
        return "no fit"
    return f"{f.b_crit:,.0f} [{f.low:,.0f}–{f.high:,.0f}]"


def _error(f: CritFit, ref: CritFit) -> str:
    return f"{f.b_crit / ref.b_crit - 1:+.0%}" if math.isfinite(f.b_crit) else "–"


def cadence_table(fits: dict[tuple[int, str], CritFit]) -> str:
    ref = fits[(1, "after")]
    rows: list[tuple[object, ...]] = [
        ("every step (reference)", _interval(ref), "–", _interval(ref), "–", "1.00", f"{ref.s_min:,.0f} / same")
    ]
    for k in CADENCES:
        before, after = fits[(k, "before")], fits[(k, "after")]
        rows.append(
            (
                f"every {k} steps",
                _interval(before),
                _error(before, ref),
                f"**{_interval(after)}**",
                _error(after, ref),
                f"{after.b_crit / before.b_crit:.2f}",
                f"{before.s_min:,.0f} / {after.s_min:,.0f}",
            )
        )
    header = [
        "evaluation cadence",
        "first evaluation at the target (before): B_crit [95%]",
        "error",
        "interpolated crossing (now): B_crit [95%]",
        "error",
        "after / before",
        "S_min before / after",
    ]
    return markdown_table(header, rows)


def hovering(curve: Curve) -> int:
    """Steps from the first evaluation at the target to the last one below it, in the recorded curve."""
    first = next(i for i, v in enumerate(curve.acc) if v >= TARGET)
    return max((i for i, v in enumerate(curve.acc) if v < TARGET and i > first), default=first) - first


def fastest_table(runs: list[Curve], fits: dict[tuple[int, str], CritFit], grid: Grid) -> str:
    """Per batch size: the fastest learning rate and its steps at every step and every k steps, both readings."""
    k = max(CADENCES)
    columns = [(1, "after"), (k, "before"), (k, "after")]
    tables = {key: fits[key].fastest.set_index("batch_size") for key in columns}
    rows = []
    for b in grid.batch_sizes:
        cells: list[object] = [f"{b:,}"]
        for key in columns:
            if b not in tables[key].index:
                cells.append("not reached")
                continue
            row = tables[key].loc[b]
            edge = " (edge)" if row["lr"] in (min(grid.lrs(b)), max(grid.lrs(b))) else ""
            cells.append(f"{row['final/steps_to_target']:,.1f} (lr {row['lr']:.3g}{edge})")
        if b in tables[(1, "after")].index:
            lr = tables[(1, "after")].loc[b]["lr"]
            cells.append(", ".join(str(hovering(c)) for c in runs if c.batch_size == b and c.lr == lr))
        rows.append(tuple(cells))
    header = [
        "batch size",
        "every step: steps (fastest lr)",
        f"every {k}, first evaluation at the target",
        f"every {k}, interpolated",
        "every step: steps from the first evaluation at the target to the last below it (per seed)",
    ]
    return markdown_table(header, rows)


# ---- B: the noise scale along one run -------------------------------------------------------------


@dataclass(frozen=True)
class NoiseRun:
    batch_size: int = 64
    lr: float = ladder(LR_CENTRE[64])  # the fastest at batch 64 in A
    max_steps: int = 3000
    window: int = 100  # gns_window: B_simple at an evaluation is over the measurements of these last steps
    every: int = 10  # evaluations (and weight copies) every this many steps; exact values at each in a window
    report_at: tuple[int, ...] = (200, 400, 800, 1200, 1600, 2000, 2500, 3000)

    def snapshot_steps(self) -> set[int]:
        return {s - d for s in self.report_at for d in range(0, self.window + 1, self.every)}


NOISE_FULL = NoiseRun()
NOISE_QUICK = NoiseRun(max_steps=1000, report_at=(200, 400, 700, 1000))


class Snapshots(Sink):
    """A recording sink that also copies the model's weights at chosen evaluations."""

    def __init__(self, model: nn.Module, steps: set[int]) -> None:
        self.recorder = RecordingSink()
        self.history = self.recorder.history
        self.model = model
        self.steps = steps
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.recorder.metrics(step, values)

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        self.recorder.series(key, first_step, values)

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        if step in self.steps:
            self.weights[step] = copy.deepcopy(self.model.state_dict())
        return self.recorder.evaluated(step, values)


def exact_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[float, float]:
    """(|G|², tr Σ) over the whole set from every example's gradient, for a model of Linear layers.

    An example's gradient of a Linear layer's weight is the outer product of the gradient at its
    output, δ_i, and its input, a_i, so its squared norm is |δ_i|² (|a_i|² + 1) with the bias:
    one forward and backward pass over all examples (Goodfellow 2015): 0.2 s for this model,
    where torch.func's vmap(grad) over the 8,000 examples took 30–40 s on the loaded 2-core
    machine; `per_example_noise` (torch.func) checks it in the benchmark. tr Σ is the covariance of
    the examples' gradients over the N examples (divided by N), what the loop's finite-population
    correction estimates; B_simple = tr Σ / |G|².
    """
    import torch
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = [p for m in linears for p in m.parameters()]
    if {id(p) for p in params} != {id(p) for p in model.parameters() if p.requires_grad}:
        raise ValueError("exact_noise needs a model whose parameters all belong to Linear layers.")
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, args, out: seen.__setitem__(m, (args[0], out))) for m in linears]
    try:
        outputs = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    n = len(x)
    total_loss = loss_fn(outputs, y) * n  # the sum of the examples' losses: δ_i is example i's own
    grads = torch.autograd.grad(total_loss, [*(seen[m][1] for m in linears), *params])
    squares = 0.0
    for m, delta in zip(linears, grads[: len(linears)], strict=True):
        inputs_sq = seen[m][0].detach().double().square().sum(1) + (1.0 if m.bias is not None else 0.0)
        squares += float((delta.double().square().sum(1) * inputs_sq).sum())
    grad_sq = float(sum((g.double() / n).square().sum() for g in grads[len(linears) :]))
    return grad_sq, squares / n - grad_sq


def per_example_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[float, float]:
    """(|G|², tr Σ) from every example's gradient by torch.func.

    As tests/trainers_tests/test_noise_scale_offline.py does."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(len(x), -1) for v in per_example.values()], dim=1).double()
    mean = g.mean(0)
    grad_sq = float(mean @ mean)
    return grad_sq, float(g.square().sum(1).mean()) - grad_sq


def ema_reads(raw: list[tuple[int, float, float]], steps: Sequence[int], beta: float = 0.95) -> dict[int, float]:
    """The old estimator at each step: bias-corrected EMAs of |G|² and tr Σ, divided (NaN where |G|² ≤ 0)."""
    out, g, t, w, i = {}, 0.0, 0.0, 0.0, 0
    for step in steps:
        while i < len(raw) and raw[i][0] <= step:
            g, t, w = beta * g + (1 - beta) * raw[i][1], beta * t + (1 - beta) * raw[i][2], beta * w + (1 - beta)
            i += 1
        out[step] = t / g if w > 0 and g > 0 else math.nan
    return out


@dataclass(frozen=True)
class NoiseTrace:
    """What the run logged, the exact (|G|², tr Σ) at the snapshot steps, and the cross-check."""

    history: dict[str, list[tuple[int, float]]]
    exact: dict[int, tuple[float, float]]
    check: tuple[float, float]  # B_simple in closed form and by torch.func, on the first snapshot's weights
    seconds: float


def trace_noise(run: NoiseRun, check_examples: int = 400) -> NoiseTrace:
    """Train the run, copying the weights every `run.every` steps in the window before each reported step."""
    import torch

    from batchscope.trainers.device import seed_everything
    from batchscope.trainers.loop import train
    from batchscope.trainers.recipes import build_task

    torch.set_num_threads(1)
    spec = TrainSpec(
        recipe="mnist1d", model="mlp", recipe_options=dict(RECIPE_OPTIONS), batch_size=run.batch_size, lr=run.lr,
        momentum=MOMENTUM, max_steps=run.max_steps, eval_every=run.every, gns=True, gns_every=1,
        gns_window=run.window, sharpness=False, device="cpu", seed=0,
    )  # fmt: skip
    started = time.perf_counter()
    seed_everything(spec.seed)
    task = build_task(spec.recipe, spec.model, spec.recipe_options, torch.device("cpu"))
    sink = Snapshots(task.model, run.snapshot_steps())
    assert train(spec, sink, task).status == "ok"
    probe = copy.deepcopy(task.model)
    exact = {}
    for step, weights in sorted(sink.weights.items()):
        probe.load_state_dict(weights)
        exact[step] = exact_noise(probe, task.train_x, task.train_y, task.loss_fn)
    probe.load_state_dict(sink.weights[min(sink.weights)])
    x, y = task.train_x[:check_examples], task.train_y[:check_examples]
    closed, by_func = (f(probe, x, y, task.loss_fn) for f in (exact_noise, per_example_noise))
    check = (closed[1] / closed[0], by_func[1] / by_func[0])
    assert math.isclose(*check, rel_tol=1e-5), f"B_simple in closed form {check[0]}, by torch.func {check[1]}"
    return NoiseTrace(sink.history, exact, check, time.perf_counter() - started)


@dataclass(frozen=True)
class NoiseRow:
    step: int
    val_loss: float
    exact_end: float  # on the weights after the step
    exact_middle: float  # half a window earlier
    exact_window: float  # ratio of the means of tr Σ and |G|² on the weights every `every` steps of the window
    loop: float
    loop_se: float
    grad_sq_signal: float  # the window's mean raw |G|² over its standard error
    negative_share: float  # raw |G|² reads below zero in the window
    ema: float
    fieller: tuple[float, float]  # the report's 95% interval over the window's measurements (analysis.noise)

    @property
    def covered(self) -> bool:
        return abs(self.loop - self.exact_window) <= 2 * self.loop_se

    @property
    def believable(self) -> bool:
        """The loop read a value (its window's |G|² clear of 0) whose s.e. claims ±50% or better."""
        return math.isfinite(self.loop) and self.loop_se <= BELIEVABLE_SE * self.loop

    @property
    def in_fieller(self) -> bool:
        """The exact value lies in the report's interval (a lower bound counts when the interval has no top)."""
        low, high = self.fieller
        return (math.isnan(low) or low <= self.exact_window) and self.exact_window <= high


def raw_measurements(history: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(step, |G|², tr Σ) of every measuring step, as the loop logged them."""
    pairs = zip(history["gns/grad_sq"], history["gns/trace_sigma"], strict=True)
    return [(s, g, t) for (s, g), (_, t) in pairs]


def window_exact(run: NoiseRun, trace: NoiseTrace, step: int) -> float:
    """tr Σ / |G|² as the loop's window would read it without sampling noise: a ratio of means over its steps.

    The measurement at step t is on the weights after step t − 1: those copied at step − window,
    step − window + every, …, step − every stand for the window's steps.
    """
    points = [trace.exact[step - d] for d in range(run.window, 0, -run.every)]
    return sum(t for _, t in points) / sum(g for g, _ in points)


def noise_rows(run: NoiseRun, trace: NoiseTrace) -> list[NoiseRow]:
    import numpy as np

    from batchscope.analysis.noise import fieller_interval

    raw = raw_measurements(trace.history)
    ema = ema_reads(raw, run.report_at)
    logged = {key: dict(trace.history[key]) for key in ("val/loss", "gns/b_simple", "gns/b_simple_se")}
    rows = []
    for s in run.report_at:
        end, middle = trace.exact[s], trace.exact[s - run.window // 2]
        in_window = [g for step, g, _ in raw if s - run.window < step <= s]
        traces = [t for step, _, t in raw if s - run.window < step <= s]
        rows.append(
            NoiseRow(
                step=s,
                val_loss=logged["val/loss"][s],
                exact_end=end[1] / end[0],
                exact_middle=middle[1] / middle[0],
                exact_window=window_exact(run, trace, s),
                loop=logged["gns/b_simple"].get(s, math.nan),
                loop_se=logged["gns/b_simple_se"].get(s, math.nan),
                grad_sq_signal=statistics.fmean(in_window) / (statistics.stdev(in_window) / len(in_window) ** 0.5),
                negative_share=sum(g < 0 for g in in_window) / len(in_window),
                ema=ema[s],
                fieller=fieller_interval(np.array(in_window), np.array(traces)),
            )
        )
    return rows


G_SQ = r"\|G\|²"  # |G|² inside a table cell, its bars escaped


def _fieller_text(bounds: tuple[float, float]) -> str:
    low, high = bounds
    if math.isnan(low):
        return "none"
    if math.isinf(high):
        return f"≥ {low:,.0f}"
    return f"{low:,.0f}–{high:,.0f}"


def noise_table(rows: list[NoiseRow], run: NoiseRun) -> str:
    body = []
    for r in rows:
        body.append(
            (
                f"{r.step:,}",
                f"{r.val_loss:.3f}",
                f"{r.exact_end:,.0f}",
                f"{r.exact_middle:,.0f}",
                f"**{r.exact_window:,.0f}**",
                f"**{r.loop:,.0f} ± {r.loop_se:,.0f}**" if math.isfinite(r.loop) else "not read",
                _fieller_text(r.fieller),
                "yes" if r.in_fieller else "no",
                f"{r.loop / r.exact_window:.2f}" if math.isfinite(r.loop) else "–",
                ("yes" if r.covered else f"no ({(r.loop - r.exact_window) / r.loop_se:+.1f} s.e.)")
                if math.isfinite(r.loop)
                else "–",
                f"{r.grad_sq_signal:.1f}",
                f"{r.negative_share:.0%}",
                f"{r.ema:,.0f}" if math.isfinite(r.ema) else f"undefined ({G_SQ} ≤ 0)",
            )
        )
    header = [
        "step",
        "val loss",
        "exact B_simple at the step",
        f"exact, {run.window // 2} steps earlier",
        f"exact over the window ({run.window} steps)",
        "in the loop ± s.e.",
        "report: Fieller 95%",
        "exact in it",
        "loop / exact over the window",
        "exact within 2 s.e.",
        f"mean raw {G_SQ} / its s.e. in the window",
        f"raw {G_SQ} < 0 in the window",
        "old reading (EMA, β = 0.95)",
    ]
    return markdown_table(header, body)


# ---- the section ----------------------------------------------------------------------------------


@dataclass
class Part:
    """Tables and notes of one half of the section, and the numbers its verdict is made of."""

    tables: list[str]
    notes: list[str]
    verdict: str
    met: bool


def cadence_part(grid: Grid) -> Part:
    started = time.perf_counter()
    runs, trained = curves(grid)
    seconds = time.perf_counter() - started
    check_every_step(runs)
    readings: dict[str, Reading] = {"before": first_reach, "after": interpolated}
    fits = {(k, name): fit(runs, reading, k) for k in (1, *CADENCES) for name, reading in readings.items()}
    checked, real, rebuilt = check_real_run(runs)
    print(
        f"check: train() with eval_every=50 at batch {checked.batch_size}, lr {checked.lr:g}, seed {checked.seed} "
        f"records steps_to_target {real:.4f}; the reconstruction from its every-step curve: {rebuilt:.4f}",
        flush=True,
    )
    ref = fits[(1, "after")].b_crit
    worst_after = max(abs(fits[(k, "after")].b_crit / ref - 1) for k in CADENCES)
    worst_before = max(abs(fits[(k, "before")].b_crit / ref - 1) for k in CADENCES)
    budgets = ", ".join(f"{b}: {STEP_BUDGET[b]:,}" for b in grid.batch_sizes)
    trained_s = sum(c.seconds for c in runs)
    evaluated = sum(len(c.acc) for c in runs)
    notes = [
        f"MNIST-1D ({RECIPE_OPTIONS['num_samples']:,} examples, 8,000 for training, 2,000 for validation), MLP "
        f"with {RECIPE_OPTIONS['hidden']} hidden units, SGD momentum {MOMENTUM}, target val_acc ≥ {TARGET}; batch "
        f"sizes {', '.join(map(str, grid.batch_sizes))} × {len(grid.lr_offsets)} learning rates each (0.15 "
        f"decades apart, around each batch size's fastest in a first pass: "
        f"{', '.join(f'{ladder(LR_CENTRE[b]):g}' for b in grid.batch_sizes)}) × {len(grid.seeds)} seed(s): "
        f"{len(runs)} runs. Each is trained once with an evaluation at every step, until an evaluation at a "
        f"multiple of every cadence has reached the target, or its step budget ({budgets}): {evaluated:,} steps "
        f"and evaluations, {trained_s:.0f} s of training summed over the runs when they were trained, in 2 "
        f"processes ({trained} trained in this run, {seconds:.0f} s; the others read from the cache).",
        "Per cadence and reading, each batch size's fastest learning rate (fewest steps, mean over seeds, every "
        "seed reached) and S(B) = S_min (1 + B_crit/B) fitted to its runs, with the 95% bootstrap interval "
        "(`analysis.tables.fastest_to_target`, `analysis.fits.fit_critical_batch`: as the report). Error: "
        "against the every-step reference. “(edge)”: the fastest is the grid's smallest or largest rate; ties "
        "(frequent for the first evaluation at the target every 50 steps) go to the smaller rate.",
        f"Checks: a real `train()` with `eval_every=50` (batch {checked.batch_size}, lr {checked.lr:g}, seed "
        f"{checked.seed}, where the two readings differ most) records steps_to_target {real:.2f}, the "
        f"reconstruction from its every-step curve {rebuilt:.2f}; every run's own every-step crossing equals "
        "the reconstruction's at cadence 1.",
    ]
    verdict = (
        f"B_crit interpolated within {worst_after:.0%} of the reference at every cadence, the first evaluation at "
        f"the target up to {worst_before:.0%} off"
    )
    return Part([cadence_table(fits), fastest_table(runs, fits, grid)], notes, verdict, worst_after <= ACCEPTABLE_ERROR)


def noise_part(run: NoiseRun) -> Part:
    trace = trace_noise(run)
    rows = noise_rows(run, trace)
    raw = raw_measurements(trace.history)
    negative = sum(g < 0 for _, g, _ in raw) / len(raw)
    notes = [
        f"One run at batch {run.batch_size}, lr {run.lr:g} (the fastest at batch 64 in the grid above), "
        f"{run.max_steps:,} steps, the noise scale measured on every step (its batch split into halves of "
        f"{run.batch_size // 2}), `gns_window={run.window}`: the loop's B_simple at a step is the ratio of the "
        f"means of its last {run.window} raw |G|² and tr Σ, with the delta method's standard error. The weights "
        f"are copied every {run.every} steps in the window before each reported step; exact B_simple = tr Σ / |G|² "
        "over the 8,000 training examples from every example's gradient (in closed form for Linear layers; on "
        f"400 examples it equals torch.func's vmap(grad): {trace.check[0]:.6g} against {trace.check[1]:.6g}). "
        f"“Over the window”: the ratio of the means of the exact tr Σ and |G|² on the {run.window // run.every} "
        f"copies the window's measurements stand on ({trace.seconds:.0f} s in all).",
        "Mean raw |G|² / its s.e.: how far the window's |G|² is from zero in its own noise; where it is below "
        "about 3 the ratio's denominator is mostly noise and the delta method's s.e. (a linearisation around "
        f"the ratio read) is no longer a guide. {negative:.0%} of the raw |G|² reads over the run are negative. "
        "The loop therefore reads nothing where the window's |G|² is within 3 s.e. of 0 (“not read”), and the "
        "report gives Fieller's 95% interval over the same measurements (`analysis.noise.fieller_interval`), "
        "which has no upper end there (“≥”: a lower bound).",
        f"The old reading: bias-corrected EMAs (β = 0.95) of the same {len(raw):,} raw measurements from step 1, "
        "divided at the step (batchscope's estimator before the window).",
    ]
    judged = [r for r in rows if r.believable]
    covered = sum(r.covered for r in judged)
    in_fieller = sum(r.in_fieller for r in rows)
    not_read = sum(not math.isfinite(r.loop) for r in rows)
    verdict = (
        f"the report's interval holds the exact noise scale at {in_fieller} of {len(rows)} steps; the loop reads "
        f"{len(rows) - not_read} (none where its window's |G|² is within 3 s.e. of 0), and where its s.e. is within "
        f"±{BELIEVABLE_SE:.0%} the exact value is within 2 s.e. at {covered} of {len(judged)}"
    )
    met = in_fieller >= COVERAGE * len(rows) and (not judged or covered >= COVERAGE * len(judged))
    return Part([noise_table(rows, run)], notes, verdict, met)


def _met(met: bool) -> str:
    return "met" if met else "missed"


def findings_section(quick: bool) -> Section:
    cadence = cadence_part(QUICK if quick else FULL)
    noise = noise_part(NOISE_QUICK if quick else NOISE_FULL)
    met = cadence.met and noise.met
    return Section(
        name="findings",
        title="7. Findings you can trust: steps to target and the noise scale",
        target=f"B_crit from interpolated steps to target within {ACCEPTABLE_ERROR:.0%} of the every-step "
        f"reference at evaluation cadences {', '.join(map(str, CADENCES))}; where the loop's noise scale claims "
        f"±{BELIEVABLE_SE:.0%} or better, the exact value within 2 of its s.e., and the report's interval holding "
        f"it, at ≥ {COVERAGE:.0%} of the steps",
        verdict=f"{_met(met)} (steps to target: {_met(cadence.met)}, {cadence.verdict}; noise scale: "
        f"{_met(noise.met)}, {noise.verdict})",
        tables=cadence.tables + noise.tables,
        notes=cadence.notes + noise.notes,
    )
