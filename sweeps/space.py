"""The Optuna side of a config: sampler, pruner, directions and the search space."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import optuna

from batchscope.sweeps.config import LrRange, SearchConfig, SweepConfig, TrainConfig, config_to_dict
from batchscope.sweeps.config_params import ParamValues
from batchscope.sweeps.ordered_batch import OrderedBatchSampler, is_ordered, suggest_batch_size, suggest_ordered

# objective name -> (direction, per-seed metric it reads from the trainer's final metrics)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_loss": ("minimize", "final/tail_val_loss"),
    "val_acc": ("maximize", "final/tail_val_acc"),
    "steps_to_target": ("minimize", "final/steps_to_target"),
    "time_to_target": ("minimize", "final/time_to_target_s"),
}
# The eval metric reported to Optuna for pruning, per objective.
PRUNING_METRIC = {"val_loss": "val/loss", "val_acc": "val/acc"}
# Per-eval metric -> the final metric holding its mean over a run's last `search.objective_evals`
# evaluations: the val_loss / val_acc objectives. One evaluation on a validation set is noisy (about
# ±1.5 points of accuracy on 1,000 examples), and the best of many is biased upwards, towards
# configurations whose accuracy swings; the mean of the last few measures where training ended.
TAIL_METRICS = {"val/loss": "final/tail_val_loss", "val/acc": "final/tail_val_acc"}


def tail_means(evals: Sequence[Mapping[str, float]], n: int, final: Mapping[str, float]) -> dict[str, float]:
    """`final/tail_*`: the mean of each TAIL_METRICS metric over the last `n` of a run's evaluations.

    A metric the evaluations lack (a run with no evaluation reaching the sweep) takes the run's
    final evaluation (`final/val_loss`, `final/val_acc`) instead.
    """
    out: dict[str, float] = {}
    for key, name in TAIL_METRICS.items():
        values = [float(e[key]) for e in evals if key in e][-n:]
        if values:
            out[name] = sum(values) / len(values)
        elif (fallback := final.get(key.replace("val/", "final/val_"))) is not None:
            out[name] = float(fallback)
    return out


def directions(search: SearchConfig) -> list[str]:
    return [OBJECTIVES[o][0] for o in search.objectives]


def make_sampler(search: SearchConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with `seed` (default `search.seed`), wrapped so that the
    batch size, an int on a log scale, and `search.params`' lists of numbers, each on its own
    ordered axis, only take the configured values (sweeps.ordered_batch).

    A sweep passes its process's own seed (`process_seed`): processes sharing a study with one
    seed would propose the same trials.
    """
    seed = search.seed if seed is None else seed
    batches = search.batch_choices()
    inner: optuna.samplers.BaseSampler
    random_trials: float = 0  # finished trials during which `inner` draws at random
    if search.sampler == "grid":
        grid: dict[str, Any] = {"batch_size": batches, "lr": search.lr_choices()}
        grid |= {name: space.choices() for name, space in search.params.items()}
        inner = optuna.samplers.GridSampler(grid, seed=seed)
    elif search.sampler == "random":
        inner, random_trials = optuna.samplers.RandomSampler(seed=seed), math.inf
    elif search.sampler == "frontier":
        from batchscope.sweeps.frontier import FrontierSampler

        # Its proposals follow from the study's trials (pending ones included): the seed only
        # breaks ties once the grid is used up, so a per-process seed is safe.
        inner = FrontierSampler(seed=seed, batch_sizes=batches)
    else:
        # A few random trials first, then TPE; multivariate TPE models batch size and lr jointly.
        random_trials = min(8, search.n_trials // 3 or 1)
        inner = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=int(random_trials))
    # search.params' lists of numbers go on ordered axes too; frontier samples them at random.
    others = {n: p.choices() for n, p in search.params.items() if isinstance(p, ParamValues) and is_ordered(p.values)}
    others_random = math.inf if search.sampler == "frontier" else random_trials
    return OrderedBatchSampler(
        inner, batches, random_trials=random_trials, seed=seed, others=others, others_random=others_random
    )


def sampler_seed(search: SearchConfig) -> int:
    """The seed this process's sampler uses (recorded on each trial it asks for).

    The grid sampler keeps the study's seed (0 if none): it shuffles the grid with it, and trial
    number k of any process takes point k, so processes never repeat a point only if they
    shuffle alike (a resumed demo with per-process seeds ran 15 of its 72 points twice). Every
    other sampler gets a seed of this process's own (`process_seed`).
    """
    if search.sampler == "grid":
        return search.seed if search.seed is not None else 0
    return process_seed(search.seed)


def process_seed(study_seed: int | None) -> int:
    """The sampler seed of one sweep or worker process: the study's seed combined with a value
    unique to this process (host, pid, start time, random bytes).

    Every worker of a shared study seeded alike would sample the same trials (three PostgreSQL
    workers ran trials 0, 1, 2 with identical parameters), and a restarted sweep would replay
    the sequence it had already run. The seed is recorded on each trial (`sampler_seed`).
    """
    import hashlib
    import socket
    import time

    token = f"{study_seed}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}:{os.urandom(8).hex()}"
    return int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little")


def pruning_unit(train: TrainConfig) -> Literal["steps", "samples"]:
    """What trials are compared at when pruning: steps under a step budget, examples seen otherwise.

    Under a sample or epoch budget a batch of 1,024 takes 64× fewer steps than one of 16; at equal
    steps it has seen 64× more data, so comparing there would prune small batches for being early.
    At equal examples every trial has used the same share of its budget.
    """
    return "steps" if train.max_samples is None and train.max_epochs is None else "samples"


def pruning_step(train: TrainConfig, step: int, batch_size: int) -> int:
    """The step a trial's intermediate value is reported to Optuna at (see `pruning_unit`)."""
    return step if pruning_unit(train) == "steps" else step * batch_size


def frontier_pruning(cfg: SweepConfig) -> bool:
    """Whether `make_pruner` gives FrontierPruner: `pruner: auto` (the default) under
    `sampler: frontier` with the objective steps_to_target, the steps to `train.target` it compares.
    An explicit `pruner: none` stays none."""
    search = cfg.search
    return search.pruner == "auto" and search.sampler == "frontier" and search.objectives == ["steps_to_target"]


def pruning_metric(cfg: SweepConfig) -> str | None:
    """The evaluation metric a trial reports to the pruner, or None for no reports.

    The objective's metric (PRUNING_METRIC), except under FrontierPruner: it measures the distance
    to the target, so it gets the target's metric (`val/acc`, `val/loss`, `val/ppl`…), which
    PRUNING_METRIC, keyed by objective alone, cannot name. Other pruners get nothing under
    steps_to_target: they would rank accuracies in the study's direction, which minimizes steps.
    """
    if len(cfg.search.objectives) != 1:
        return None
    if frontier_pruning(cfg):
        return cfg.train.target.metric if cfg.train.target is not None else None
    return PRUNING_METRIC.get(cfg.search.objectives[0])


# Metric-name endings that rise to a target; the rest fall to it. The rule of
# trainers.evaluation.target_reached, restated here so that the sweep process need not import torch.
_RISING = ("acc", "accuracy", "bleu", "f1", "auc")


def target_direction(metric: str) -> Literal["maximize", "minimize"]:
    """Whether `metric` rises to a target (accuracy) or falls to it (loss, perplexity)."""
    return "maximize" if metric.endswith(_RISING) else "minimize"


REDUCTION_FACTOR = 5  # `pruner: successive_halving`: a trial goes on if it is in the best 1/5 at a rung


def make_pruner(cfg: SweepConfig, num_train: int | None = None) -> optuna.pruners.BasePruner:
    """The configured pruner, its resources in the unit of `pruning_unit`.

    `num_train` (the training-set size) is needed for Hyperband under an epoch budget only.
    `pruner: auto` is FrontierPruner where `frontier_pruning` says so (it is reported the
    target's metric: `pruning_metric`), and no pruning elsewhere.
    """
    search, train = cfg.search, cfg.train
    by_samples = pruning_unit(train) == "samples"
    # The first point where every batch size has been evaluated: one evaluation, or under a sample
    # budget the examples the largest batch sees before its first evaluation.
    first = train.eval_every * (max(search.batch_choices()) if by_samples else 1)
    if frontier_pruning(cfg):
        from batchscope.sweeps.frontier_pruner import FrontierPruner

        assert train.target is not None  # steps_to_target is refused without one (SweepConfig)
        return FrontierPruner(train.target.value, target_direction(train.target.metric), unit=pruning_unit(train))
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2 * first)
    if search.pruner == "successive_halving":
        # Asynchronous successive halving: at one evaluation, then at 5×, 25×… as many steps, a trial
        # goes on only if it is in the best fifth of the trials that got that far. Benchmark 4: 44% of a
        # grid's compute to find its answer over 25 real searches (factor 4: 49%); see 4b for replays.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=REDUCTION_FACTOR)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=max(first, _budget(train, num_train)), reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def _budget(train: TrainConfig, num_train: int | None) -> int:
    """A trial's whole budget in the unit of `pruning_unit`."""
    if train.max_samples is not None:
        return train.max_samples
    if train.max_epochs is not None:
        if num_train is None:
            raise ValueError("an epoch budget needs num_train (the training-set size) for Hyperband's max_resource")
        return math.ceil(train.max_epochs * num_train)
    return train.max_steps or 1000


def grid_size(search: SearchConfig) -> int | None:
    if search.sampler != "grid":
        return None
    lrs = search.lr_choices() or []
    return math.prod([len(search.batch_choices()), len(lrs), *(len(p.choices()) for p in search.params.values())])


PARAMS = ("batch_size", "lr")  # what `suggest` samples first, in this order (then `search.params`)


def sampled(params: Mapping[str, Any]) -> bool:
    """Whether a trial got its batch size and lr (a worker may die between ask and suggest). One
    re-run without some of `search.params` gets those sampled afresh by Optuna (enqueued trials
    sample what they were not given)."""
    return all(name in params for name in PARAMS)


def suggest(trial: optuna.trial.BaseTrial, search: SearchConfig) -> dict[str, Any]:
    """Sample (batch_size, lr), then `search.params` in the config's order. The batch size is one
    of the listed or power-of-two values, on an ordered log axis (an int, or a categorical in a
    study an earlier version created: sweeps.ordered_batch); a list of numbers in `search.params`
    is on an ordered axis too, a list of text or true/false a categorical."""
    params: dict[str, Any] = {"batch_size": suggest_batch_size(trial, search.batch_choices())}
    lrs = search.lr_choices()
    if lrs is not None:
        params["lr"] = trial.suggest_categorical("lr", lrs)
    else:
        assert isinstance(search.lr, LrRange)
        params["lr"] = trial.suggest_float("lr", search.lr.low, search.lr.high, log=search.lr.log)
    for name, space in search.params.items():
        if isinstance(space, ParamValues) and is_ordered(space.values):
            params[name] = suggest_ordered(trial, name, space.choices())
        elif isinstance(space, ParamValues):  # text or true/false: no order
            params[name] = trial.suggest_categorical(name, space.choices())
        elif space.integer:
            params[name] = trial.suggest_int(name, int(space.low), int(space.high), log=space.log)
        else:
            params[name] = trial.suggest_float(name, float(space.low), float(space.high), log=space.log)
    return params


def fingerprint(cfg: SweepConfig) -> str:
    """What makes two sweeps the same study: the space, the objective, the training recipe."""
    d = config_to_dict(cfg)
    keep = {
        "search": {k: d["search"][k] for k in ("batch_size", "lr", "objective", "objective_evals")}
        # Only when given, so that a study fingerprinted before search.params existed still matches.
        | ({"params": d["search"]["params"]} if cfg.search.params else {}),
        "trainer": d["trainer"],
        "train": d["train"],
    }
    return comparable(json.dumps(keep, sort_keys=True))


# Settings that do not change the question: operational ones (logging, checkpoints, processes per
# trial) and measurements and guards (the noise scale, the divergence threshold).
_NOT_COMPARED = ("log_every", "log_every_step", "checkpoint", "distributed", "compile", "gns", "divergence_factor")


def comparable(fp: str) -> str:
    """A fingerprint without the settings that do not change the question, so that a study
    fingerprinted by an earlier version (which compared some of them) still matches."""
    d = json.loads(fp)
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k not in _NOT_COMPARED}
    return json.dumps(d, sort_keys=True)


def describe_difference(old: str, new: str) -> str:
    a, b = _flatten(json.loads(old)), _flatten(json.loads(new))
    diffs = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + (" …" if len(diffs) > 4 else "")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def objective_values(search: SearchConfig, finals: list[Mapping[str, float]]) -> list[float]:
    """Mean over seeds of each objective; a target never reached counts as infinitely slow."""
    values = []
    for name in search.objectives:
        key = OBJECTIVES[name][1]
        per_seed = [float(f.get(key, math.inf)) for f in finals]
        values.append(sum(per_seed) / len(per_seed))
    return values
