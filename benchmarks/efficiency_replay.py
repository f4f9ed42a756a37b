"""Sweep efficiency replayed: the expected compute of a search over many sampler seeds.

Section 4 runs five real searches; each is one draw from a wide distribution (one seed needs
20% of the grid's compute, another 50%), and a search that has not reached the target by the
grid's trial count is cut off there, so its figure is a lower bound. This section measures the
distribution instead. It trains the space once, densely (every batch size × 41 log-spaced learning
rates, for two training seeds: two "worlds" whose trials differ only in the draw of initial
weights and batches), keeping every evaluation. It then replays searches on it: batchscope's own
sampler, pruner and search space (`sweeps.space`, as `batchscope sweep` builds them) choose the
trials, a chosen learning rate takes the nearest trained one (0.06 decades apart), and each trial
reports the trained run's evaluations to the pruner, which may stop it; the compute counted is
the examples trained up to there. Each search runs until a trial comes within 1% of its world's
grid best (the grid being section 4's six learning rates, every 8th), or up to three times the
grid's trial count.

Per configuration: the mean compute share over all seeds and worlds counted to the first trial
within 1% (a search that never gets there counts all it spent), and the same with the search cut
off at the grid's trial count (section 4's rule), with how many searches were cut off.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Section, code_digest, markdown_table
from benchmarks.efficiency import FULL, QUICK, TARGET_SHARE, WITHIN, Space, sweep_config

CACHE = Path("/tmp/batchscope-bench")
LR_POINTS = 41  # includes section 4's six grid points (every 8th); quick mode's four are taken as the nearest


@dataclass(frozen=True)
class Run:
    """One trained configuration: its evaluations (val/acc at eval steps) and how it ended."""

    status: str
    steps: int
    eval_steps: tuple[int, ...]
    evals: tuple[float, ...]


World = dict[tuple[int, float], Run]


def learning_rates(space: Space) -> list[float]:
    a, b = math.log10(space.lr_low), math.log10(space.lr_high)
    n = LR_POINTS - 1
    return [float(f"{10 ** (a + (b - a) * i / n):.6g}") for i in range(LR_POINTS)]


def _train_one(args: tuple[dict[str, Any], int, float, int]) -> tuple[int, float, dict[str, Any]]:
    import torch

    from sweeps.config import validate
    from sweeps.runner import make_spec
    from trainers.loop import train
    from trainers.spec import RecordingSink

    torch.set_num_threads(1)
    raw, batch_size, lr, seed = args
    spec = make_spec(validate(raw, "benchmarks/efficiency_replay.py"), batch_size, lr, seed)
    sink = RecordingSink()
    result = train(spec, sink)
    history = sink.history.get("val/acc", [])
    return (
        batch_size,
        lr,
        {
            "status": result.status,
            "steps": result.steps,
            "eval_steps": [s for s, _ in history],
            "evals": [v for _, v in history],
        },
    )


def landscape(space: Space, train_seed: int, processes: int = 2) -> World:
    """Every batch size × `LR_POINTS` learning rates trained once (cached by space and code)."""
    cfg = sweep_config(space, "landscape", "grid", "none", 1, 0)
    raw = json.loads(cfg.model_dump_json())
    key = hashlib.sha256(json.dumps([raw["trainer"], raw["train"], LR_POINTS, train_seed, code_digest()]).encode())
    path = CACHE / f"efficiency-landscape-{key.hexdigest()[:12]}.json"
    if not path.exists():
        jobs = [(raw, b, lr, train_seed) for b in space.batch_sizes for lr in learning_rates(space)]
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited torch state
        with ctx.Pool(processes) as pool:
            rows = pool.map(_train_one, jobs, chunksize=1)
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([[b, lr, r] for b, lr, r in rows]))
    world: World = {}
    for b, lr, r in json.loads(path.read_text()):
        world[(int(b), float(lr))] = Run(r["status"], r["steps"], tuple(r["eval_steps"]), tuple(r["evals"]))
    return world


def section4_grid(space: Space) -> list[float]:
    a, b = math.log10(space.lr_low), math.log10(space.lr_high)
    n = space.lr_points - 1
    return [10 ** (a + (b - a) * i / n) for i in range(space.lr_points)]


def tail(run: Run) -> float | None:
    """The val_acc objective: the mean of the last few evaluations of a run that ended well."""
    from benchmarks.efficiency import OBJECTIVE_EVALS

    if run.status != "ok" or not run.evals:
        return None
    last = run.evals[-OBJECTIVE_EVALS:]
    return sum(last) / len(last)


def grid_reference(space: Space, world: World) -> tuple[float, int]:
    """The grid's best objective and its total compute (examples)."""
    trained = learning_rates(space)
    grid_lrs = [min(trained, key=lambda t: abs(math.log(t / lr))) for lr in section4_grid(space)]
    points = [(b, lr) for b in space.batch_sizes for lr in grid_lrs]
    best = max(v for p in points if (v := tail(world[p])) is not None)
    return best, sum(world[p].steps * p[0] for p in points)


@dataclass(frozen=True)
class Search:
    name: str
    sampler: str  # search.sampler
    pruner: str  # search.pruner
    make_pruner: Callable[[Any], Any] | None = None  # replaces sweeps.space.make_pruner (variants)


def replay(space: Space, world: World, search: Search, seed: int, target: float, max_trials: int) -> list[int]:
    """One search: the cumulative compute after each trial, up to the first trial reaching `target`.

    Returns the list of cumulative examples; the search reached the target if its last trial did
    (see `reached`).
    """
    import numpy as np
    import optuna

    from sweeps import space as sp

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = sweep_config(space, "replay", search.sampler, search.pruner, 24, seed)
    pruner = search.make_pruner(cfg) if search.make_pruner else sp.make_pruner(cfg)
    study = optuna.create_study(direction="maximize", sampler=sp.make_sampler(cfg.search), pruner=pruner)
    lrs = sorted({lr for _, lr in world})
    log_lrs = np.log(lrs)
    spent, history = 0, []
    for _ in range(max_trials):
        trial = study.ask()
        params = sp.suggest(trial, cfg.search)
        b = int(params["batch_size"])
        run = world[(b, lrs[int(np.argmin(np.abs(log_lrs - math.log(params["lr"]))))])]
        steps, pruned = run.steps, False
        for step, value in zip(run.eval_steps, run.evals, strict=True):
            trial.report(value, sp.pruning_step(cfg.train, step, b))
            if trial.should_prune():
                steps, pruned = step, True
                break
        spent += steps * b
        history.append(spent)
        objective = tail(run)
        if pruned or objective is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, objective)
        if objective >= target:
            history.append(-1)  # marker: reached
            break
    return history


def reached(history: list[int]) -> bool:
    return bool(history) and history[-1] == -1


def shares(
    space: Space, worlds: list[World], search: Search, seeds: range
) -> tuple[list[float], list[float], int, int]:
    """Per search: compute share to reach (uncut), the same cut at the grid's trial count; misses of each."""
    uncut, cut, miss_uncut, miss_cut = [], [], 0, 0
    for world in worlds:
        best, total = grid_reference(space, world)
        for seed in seeds:
            h = replay(space, world, search, seed, best * (1 - WITHIN), 3 * space.grid_trials)
            ok = reached(h)
            spent = [x for x in h if x >= 0]
            uncut.append(spent[-1] / total)
            miss_uncut += not ok
            within = ok and len(spent) <= space.grid_trials
            cut.append(spent[min(len(spent), space.grid_trials) - 1] / total)
            miss_cut += not within
    return uncut, cut, miss_uncut, miss_cut


def searches() -> list[Search]:
    import optuna

    return [
        Search("TPE + successive halving (factor 5): section 4's", "tpe", "successive_halving"),
        Search(
            "TPE + successive halving, factor 3",
            "tpe",
            "successive_halving",
            lambda cfg: optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.train.eval_every, reduction_factor=3),
        ),
        Search("TPE + median pruner", "tpe", "median"),
        Search("TPE + Hyperband", "tpe", "hyperband"),
        Search("TPE, no pruning", "tpe", "none"),
        Search("random + successive halving (factor 5)", "random", "successive_halving"),
    ]


def replay_section(quick: bool) -> Section:
    space = QUICK if quick else FULL
    train_seeds = (0,) if quick else (0, 1)
    seeds = range(5 if quick else 50)
    worlds = [landscape(space, s) for s in train_seeds]
    rows: list[tuple[object, ...]] = []
    default_mean = math.nan
    for search in searches()[: 2 if quick else None]:
        uncut, cut, miss_uncut, miss_cut = shares(space, worlds, search, seeds)
        mean = statistics.mean(uncut)
        if search.pruner == "successive_halving" and search.make_pruner is None and search.sampler == "tpe":
            default_mean = mean
        sem = statistics.stdev(uncut) / math.sqrt(len(uncut)) if len(uncut) > 1 else math.nan
        q = statistics.quantiles(uncut, n=10)
        rows.append(
            (
                search.name,
                len(uncut),
                f"{mean:.0%} ± {sem:.0%}",
                f"{statistics.median(uncut):.0%}",
                f"{q[-1]:.0%}",
                miss_uncut,
                f"{statistics.mean(cut):.0%}",
                miss_cut,
            )
        )
    table = markdown_table(
        [
            "search",
            "searches",
            "mean compute to reach (± s.e.)",
            "median",
            "90th pct",
            f"not reached in {3 * space.grid_trials} trials",
            f"mean, cut at {space.grid_trials} trials (lower bound)",
            f"cut off at {space.grid_trials}",
        ],
        rows,
        "lrrrrrrr",
    )
    sizes = ", ".join(f"{grid_reference(space, w)[0]:.4f}" for w in worlds)
    met = default_mean <= TARGET_SHARE
    return Section(
        name="replay",
        title="4b. Sweep efficiency, replayed: the expected compute over many sampler seeds",
        target=f"≤ {TARGET_SHARE:.0%} of the grid's compute to come within {WITHIN:.0%} of its best, "
        "as the mean over searches (batchscope's default search: TPE, with successive halving)",
        verdict=("met" if met else "missed") + f" ({default_mean:.0%})",
        tables=[table],
        notes=[
            f"Section 4's space ({len(space.batch_sizes)} batch sizes, learning rates {space.lr_low}–{space.lr_high}, "
            f"{space.max_steps} steps) trained at {len(space.batch_sizes)} × {LR_POINTS} points for "
            f"{len(train_seeds)} training seed(s) (grid best val_acc: {sizes}); {len(seeds)} sampler seeds per "
            "world; every search goes on until a trial is within 1% of the grid's best or "
            f"{3 * space.grid_trials} trials.",
            "A search is batchscope's own sampler, pruner and space (`sweeps.space`); a sampled learning rate "
            "takes the nearest trained one, so a replayed trial is a real training run's curve.",
            "Cut at the grid's trial count, as section 4 does, a search that has not found the target counts "
            "what it spent until then: a lower bound, and an optimistic mean.",
        ],
    )
