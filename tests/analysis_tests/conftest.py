"""A fake-but-real sweep: a synthetic model of training written through MLflow's and Optuna's
public APIs exactly as the tracking contract says, so the analysis reads real stores.

`make_synthetic_sweep` is importable (``from tests.analysis_tests.conftest import ...``) so the
load/report benchmark can reuse it with bigger numbers.

The model of training (McCandlish et al. 2018, with made-up constants):
- the best learning rate grows as lr*(B) = LR_AT_64 · (B/64)^lr_exponent;
- at lr*, steps to reach the target are S(B) = S_min (1 + B_crit/B); a learning rate off by a
  factor r costs a factor exp(ln(r)² / (2·0.7²)) more steps, and above 4·lr* the run diverges;
- validation loss decays exponentially and crosses the target at exactly those steps;
- the gradient noise scale B_simple grows from 0.3·B_crit to 1.2·B_crit as the loss falls;
- a step costs 2 ms + 0.05 ms per example, peak memory is 50 MB + 0.8 MB per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

LR_AT_64 = 0.021
INITIAL_LOSS = 2.3
LR_TOLERANCE = 0.7  # width, in ln(lr), of the bowl around the best learning rate
DIVERGENCE_FACTOR = 4.0
GNS_EVERY = 5  # steps between noise-scale measurements
SETUP_S = 1.5  # wall time spent before the first step (data, model)


@dataclass(frozen=True)
class SweepSpec:
    """What to generate; the defaults make a small sweep that tests load in seconds."""

    study_name: str = "synthetic"
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    lrs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
    seeds: tuple[int, ...] = (0, 1)
    s_min: float = 100.0
    b_crit: float = 128.0
    lr_exponent: float = 0.5
    target_val_loss: float = 0.6
    max_steps: int = 1000
    eval_every: int = 50
    train_loss_every: int = 1
    seed_noise: float = 0.04  # relative spread of steps to target over seeds
    prune_after_fraction: float = 0.5  # prune runs that are hopeless at this point
    prune_slowdown: float = 3.0  # hopeless: needs more than this many times max_steps
    divergence_factor: float = DIVERGENCE_FACTOR  # diverges above this many times lr*
    directions: tuple[str, ...] = ("minimize",)
    max_trials: int | None = None  # keep only the first n (batch size, lr) pairs


@dataclass
class SyntheticSweep:
    """Where the stores are and what the truth is."""

    spec: SweepSpec
    storage: optuna.storages.BaseStorage
    journal_path: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_ids: list[str] = field(default_factory=list)
    n_trials: int = 0


def best_lr(batch_size: int, spec: SweepSpec) -> float:
    return LR_AT_64 * (batch_size / 64) ** spec.lr_exponent


def steps_at_best_lr(batch_size: float, spec: SweepSpec) -> float:
    return spec.s_min * (1 + spec.b_crit / batch_size)


def open_journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _step_time_ms(batch_size: int) -> float:
    return 2.0 + 0.05 * batch_size


def _run_curves(batch_size: int, lr: float, seed: int, spec: SweepSpec, rng: np.random.Generator) -> dict[str, object]:
    """One run of the synthetic model: its histories, final metrics and status."""
    mismatch = math.log(lr / best_lr(batch_size, spec))
    slowdown = math.exp(mismatch**2 / (2 * LR_TOLERANCE**2))
    steps_needed = steps_at_best_lr(batch_size, spec) * slowdown
    steps_needed *= math.exp(rng.normal(0.0, spec.seed_noise))
    plateau = 0.2 + 0.02 * math.log2(batch_size / 16)
    final_gap = 0.05 + 0.02 * math.log2(batch_size / 16)
    # The decay rate is chosen so that the (noise-free) val loss crosses the target at
    # steps_needed; with an unreachable target it decays as if the target were 0.6.
    reachable_target = max(spec.target_val_loss, plateau + 0.05)
    tau = steps_needed / math.log((INITIAL_LOSS - plateau) / (reachable_target - plateau))

    diverged = lr > spec.divergence_factor * best_lr(batch_size, spec)
    pruned = not diverged and steps_needed > spec.prune_slowdown * spec.max_steps
    last_step = spec.max_steps
    status, reason = "ok", ""
    if diverged:
        last_step = 20 + seed
        status, reason = "diverged", f"train/loss is nan at step {last_step}"
    elif pruned:
        last_step = int(spec.max_steps * spec.prune_after_fraction)
        status, reason = "pruned", f"pruned by MedianPruner at step {last_step}"

    steps = np.arange(1, last_step + 1)
    val = plateau + (INITIAL_LOSS - plateau) * np.exp(-steps / tau)
    gap = final_gap * (1 - np.exp(-steps / tau))
    noise = rng.normal(0.0, 0.3 / math.sqrt(batch_size), size=steps.size)
    train = (val - gap) * np.exp(noise)
    if diverged:
        train = INITIAL_LOSS * np.exp(steps / 5.0)
        train[-1] = math.nan
        val = train.copy()

    step_ms = _step_time_ms(batch_size)
    # Every train_loss_every-th step, and always the last (where a diverged run turns NaN).
    train_logged = np.union1d(np.arange(0, last_step, spec.train_loss_every), [last_step - 1])
    eval_steps = steps[(steps % spec.eval_every == 0) | (steps == last_step)]
    # The noise scale, measured every GNS_EVERY steps: unbiased, noisy two-batch estimates of
    # |G|² and tr Σ around a true B_simple rising from 0.3 to 1.2 B_crit (|G|² reads may go negative).
    gns_steps = steps[steps % GNS_EVERY == 0]
    progress = 1 - (val[gns_steps - 1] - plateau) / (INITIAL_LOSS - plateau)
    true_b_simple = spec.b_crit * (0.3 + 0.9 * np.clip(progress, 0, 1))
    true_grad_sq = np.exp(-gns_steps / tau) + 0.01
    grad_sq = true_grad_sq * (1 + rng.normal(0.0, 0.8, size=gns_steps.size))
    trace = true_b_simple * true_grad_sq * (1 + rng.normal(0.0, 0.3, size=gns_steps.size))
    throughput = batch_size / (step_ms / 1000) * np.exp(rng.normal(0, 0.03, eval_steps.size))
    histories: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "train/loss": (steps[train_logged], train[train_logged]),
        "lr": (eval_steps, np.full(eval_steps.size, lr)),
        "val/loss": (eval_steps, val[eval_steps - 1]),
        "val/acc": (eval_steps, np.clip(1 - 0.35 * val[eval_steps - 1], 0, 1)),
        "gns/grad_sq": (gns_steps, grad_sq),
        "gns/trace_sigma": (gns_steps, trace),
        "perf/samples_per_s": (eval_steps, throughput),
        "perf/step_time_ms": (eval_steps, batch_size / throughput * 1000),
        "mem/peak_mb": (eval_steps, np.full(eval_steps.size, 50 + 0.8 * batch_size)),
    }

    train_time_s = last_step * step_ms / 1000
    finals: dict[str, float] = {"final/wall_s": train_time_s + SETUP_S}
    finals["final/train_time_s"] = train_time_s
    if not diverged:
        val_loss, train_loss = float(val[-1]), float(val[-1] - gap[-1])
        finals |= {
            "final/val_loss": val_loss,
            "final/train_loss": train_loss,
            "final/val_acc": 1 - 0.35 * val_loss,
            "final/train_acc": 1 - 0.35 * train_loss,
            "final/gen_gap": val_loss - train_loss,
            "final/sharpness": 5.0 * (batch_size / 16) ** 0.4 * (0.02 / lr) ** 0.3,
            "final/best_val_loss": float(val[eval_steps - 1].min()),
            "final/best_val_acc": float(1 - 0.35 * val[eval_steps - 1].min()),
        }
        # As the loop logs it: the crossing interpolated, bracketed by the evaluations around it.
        high = math.ceil(steps_needed / spec.eval_every) * spec.eval_every
        if spec.target_val_loss > plateau and high <= last_step:
            finals["final/steps_to_target"] = steps_needed
            finals["final/steps_to_target_low"] = high - spec.eval_every
            finals["final/steps_to_target_high"] = high
            finals["final/samples_to_target"] = steps_needed * batch_size
            finals["final/time_to_target_s"] = steps_needed * step_ms / 1000
    return {
        "histories": histories,
        "finals": finals,
        "status": status,
        "reason": reason,
        "step_ms": step_ms,
        "last_step": last_step,
    }


def _child_params(batch_size: int, lr: float, seed: int, spec: SweepSpec) -> dict[str, str]:
    micro = min(batch_size, 128)
    return {
        "batch_size": str(batch_size),
        "micro_batch_size": str(micro),
        "accum_steps": str(batch_size // micro),
        "lr": repr(lr),
        "effective_lr": repr(lr),
        "optimizer": "sgd",
        "momentum": "0.9",
        "weight_decay": "0.0",
        "seed": str(seed),
        "trainer": "synthetic",
        "model": "mlp",
        "dataset": "mnist1d",
        "max_steps": str(spec.max_steps),
        "device": "cpu",
        "precision": "fp32",
        "lr_scaling": "none",
        "eval_every": str(spec.eval_every),
        "gns_window": str(4 * spec.eval_every),
        "memory_measure": "process_peak_rss",
    }


def _metrics(curves: dict[str, object], start_ms: int) -> list[Metric]:
    step_ms = float(curves["step_ms"])  # type: ignore[arg-type]
    metrics: list[Metric] = []
    histories: dict[str, tuple[np.ndarray, np.ndarray]] = curves["histories"]  # type: ignore[assignment]
    for key, (steps, values) in histories.items():
        timestamps = start_ms + int(SETUP_S * 1000) + np.round(steps * step_ms).astype(int)
        metrics += [Metric(key, float(v), int(t), int(s)) for s, v, t in zip(steps, values, timestamps, strict=True)]
    end_ms = start_ms + int(SETUP_S * 1000 + int(curves["last_step"]) * step_ms)  # type: ignore[call-overload]
    finals: dict[str, float] = curves["finals"]  # type: ignore[assignment]
    metrics += [Metric(k, float(v), end_ms, int(curves["last_step"])) for k, v in finals.items()]  # type: ignore[call-overload]
    return metrics


def make_synthetic_sweep(
    root: Path,
    spec: SweepSpec,
    *,
    tracking_uri: str | None = None,
    journal_path: Path | None = None,
    rng_seed: int = 0,
) -> SyntheticSweep:
    """Write one study (Optuna journal + MLflow experiment) under `root` following the contract.

    Several sweeps can share one tracking database and one journal (pass the same paths):
    creating a fresh MLflow SQLite database costs seconds of migrations.
    """
    rng = np.random.default_rng(rng_seed)
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or f"sqlite:///{root}/mlflow.db"
    journal_path = journal_path or root / "optuna.journal"
    storage = open_journal(journal_path)
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(spec.study_name, artifact_location=(root / "artifacts").as_uri())
    study = optuna.create_study(study_name=spec.study_name, storage=storage, directions=list(spec.directions))
    base_ms = 1_700_000_000_000
    parent = client.create_run(
        experiment_id,
        start_time=base_ms,
        tags={"batchscope.role": "sweep", "optuna.study": spec.study_name},
        run_name="sweep",
    )
    sweep = SyntheticSweep(
        spec=spec,
        storage=storage,
        journal_path=journal_path,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent.info.run_id,
    )
    distributions = {
        "batch_size": optuna.distributions.CategoricalDistribution(list(spec.batch_sizes)),
        "lr": optuna.distributions.FloatDistribution(min(spec.lrs), max(spec.lrs), log=True),
    }
    pairs = [(b, lr) for b in spec.batch_sizes for lr in spec.lrs]
    # Shuffled so the optimisation history is not sorted by batch size.
    pairs = [pairs[i] for i in rng.permutation(len(pairs))][: spec.max_trials]
    clock_ms = base_ms
    for number, (batch_size, lr) in enumerate(pairs):
        run_ids, runs = [], []
        for seed in spec.seeds:
            curves = _run_curves(batch_size, lr, seed, spec, rng)
            tags = {
                "batchscope.role": "trial",
                "mlflow.parentRunId": parent.info.run_id,
                "optuna.study": spec.study_name,
                "optuna.trial_number": str(number),
                "batchscope.seed": str(seed),
                "batchscope.status": str(curves["status"]),
                "batchscope.reason": str(curves["reason"]),
            }
            run = client.create_run(experiment_id, start_time=clock_ms, tags=tags, run_name=f"t{number}-s{seed}")
            params = _child_params(batch_size, lr, seed, spec)
            client.log_batch(
                run.info.run_id,
                metrics=_metrics(curves, clock_ms),
                params=[Param(k, v) for k, v in params.items()],
            )
            wall_ms = int(float(curves["finals"]["final/wall_s"]) * 1000)  # type: ignore[index]
            end_status = {"ok": "FINISHED", "pruned": "KILLED"}.get(str(curves["status"]), "FAILED")
            client.set_terminated(run.info.run_id, end_status, end_time=clock_ms + wall_ms)
            clock_ms += wall_ms
            run_ids.append(run.info.run_id)
            runs.append(curves)
        sweep.run_ids += run_ids
        statuses = [str(r["status"]) for r in runs]
        status = next((s for s in ("diverged", "pruned") if s in statuses), "ok")
        user_attrs = {
            "mlflow_run_id": run_ids[0],
            "mlflow_run_ids": run_ids,
            "status": status,
            "reason": next((str(r["reason"]) for r in runs if r["reason"]), ""),
        }
        params_optuna = {"batch_size": batch_size, "lr": lr}
        if status == "ok":
            val_loss = float(np.mean([r["finals"]["final/val_loss"] for r in runs]))  # type: ignore[index]
            time_s = float(np.mean([r["finals"]["final/train_time_s"] for r in runs]))  # type: ignore[index]
            values = [val_loss, time_s][: len(spec.directions)]
            trial = optuna.trial.create_trial(
                values=values,
                params=params_optuna,
                distributions=distributions,
                user_attrs=user_attrs,
            )
        elif status == "pruned":
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED,
                params=params_optuna,
                distributions=distributions,
                user_attrs=user_attrs,
                intermediate_values={spec.eval_every: INITIAL_LOSS * 0.9},
            )
        else:
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.FAIL,
                params=params_optuna,
                distributions=distributions,
                user_attrs=user_attrs,
            )
        study.add_trial(trial)
    client.set_terminated(parent.info.run_id, "FINISHED", end_time=clock_ms)
    sweep.n_trials = len(pairs)
    return sweep


def make_optuna_only_study(journal_path: Path, study_name: str = "only-optuna") -> optuna.storages.BaseStorage:
    """A study whose trials never reached MLflow (there is no experiment of that name)."""
    storage = open_journal(journal_path)
    study = optuna.create_study(study_name=study_name, storage=storage)
    distributions = {"batch_size": optuna.distributions.CategoricalDistribution([32, 64])}
    for batch_size, value in ((32, 0.5), (64, 0.4)):
        study.add_trial(
            optuna.trial.create_trial(value=value, params={"batch_size": batch_size}, distributions=distributions)
        )
    return storage


# --- shared stores: built once per test session, only read by the tests -----------------

SCRIPT_NAME = "x<script>alert(1)</script>"
TRAVERSAL_NAME = "../../etc"


@dataclass
class Stores:
    root: Path
    tracking_uri: str
    storage: optuna.storages.BaseStorage
    journal_path: Path
    sweeps: dict[str, SyntheticSweep]


def build_stores(root: Path) -> Stores:
    """Several studies in one tracking database and one journal (migrations cost seconds)."""
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    journal = root / "optuna.journal"
    specs = {
        "main": SweepSpec(study_name="main", lrs=(0.005, 0.01, 0.02, 0.04, 0.08), train_loss_every=10),
        "wide": SweepSpec(
            study_name="wide",
            batch_sizes=(32, 128, 512),
            lrs=(0.01, 0.04),
            seeds=(0,),
            b_crit=256.0,
            max_steps=400,
            train_loss_every=10,
        ),
        "single": SweepSpec(study_name="single", batch_sizes=(64,), lrs=(0.02,), seeds=(0,), max_steps=300),
        "no-target": SweepSpec(
            study_name="no-target",
            batch_sizes=(32, 128),
            lrs=(0.01, 0.04),
            seeds=(0,),
            target_val_loss=0.05,
            max_steps=300,
            train_loss_every=10,
        ),
        "script": SweepSpec(
            study_name=SCRIPT_NAME,
            batch_sizes=(32, 128, 512),
            lrs=(0.01, 0.04),
            seeds=(0,),
            max_steps=600,
            train_loss_every=10,
        ),
        "traversal": SweepSpec(study_name=TRAVERSAL_NAME, batch_sizes=(64,), lrs=(0.02,), seeds=(0,), max_steps=300),
        "two-objectives": SweepSpec(
            study_name="two-objectives",
            batch_sizes=(32, 128),
            lrs=(0.01, 0.04),
            seeds=(0,),
            max_steps=300,
            train_loss_every=10,
            directions=("minimize", "minimize"),
        ),
    }
    sweeps = {
        key: make_synthetic_sweep(root, spec, tracking_uri=tracking_uri, journal_path=journal, rng_seed=i)
        for i, (key, spec) in enumerate(specs.items())
    }
    return Stores(root, tracking_uri, open_journal(journal), journal, sweeps)


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    return build_stores(tmp_path_factory.mktemp("stores"))
