"""Open a sweep's Optuna study: create it, or load it and check that it still asks the same question.

The steps, in order: load an existing study and compare its setup with the config (a changed
question is refused without --force); refuse a new study whose MLflow experiment already has
trial runs (its storage was lost); resolve `auto` batch sizes (sweeps.memory: measured once per
study, remembered with it); read the training-set size once for sample and epoch budgets;
create or load the study with its sampler and pruner.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

import batchscope
from batchscope.sweeps import memory, space
from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.config import SearchConfig, SweepConfig, config_to_dict
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.specs import budget_num_train
from batchscope.sweeps.store_setup import quiet_experimental
from batchscope.sweeps.tracking import STUDY, TRIAL, Tracker


@dataclass(frozen=True)
class OpenStudy:
    study: optuna.Study
    cfg: SweepConfig  # with `auto` batch sizes resolved
    sampler_seed: int
    max_micro: int | None  # the largest micro-batch that fits (`micro_batch_size: auto`), else None
    num_train: int | None  # the training-set size, for sample and epoch budgets only


def open_study(
    cfg: SweepConfig, storage: optuna.storages.BaseStorage, tracker: Tracker, storage_label: str, *, force: bool
) -> OpenStudy:
    try:
        existing: optuna.Study | None = optuna.load_study(study_name=cfg.study, storage=storage)
    except KeyError:
        existing = None
    fp = space.fingerprint(cfg)
    dirs = space.directions(cfg.search)
    if existing is not None:
        _check_same_question(existing, cfg.study, fp, dirs, force=force)
    elif not force:
        _refuse_lost_study(cfg.study, storage, tracker, storage_label)
    seed = space.sampler_seed(cfg.search)
    # `auto` batch sizes: measured once per study, then remembered with it.
    remembered = existing.user_attrs.get(attrs.AUTOBATCH) if existing is not None else None
    cfg, max_micro, record = memory.resolve(cfg, remembered)
    # Sample and epoch budgets need the training-set size: read once (for CIFAR-10 it reads
    # every training file), not for each trial's spec; the recipes give it without torch.
    num_train = budget_num_train(cfg)
    study = optuna.create_study(
        study_name=cfg.study,
        storage=storage,
        sampler=space.make_sampler(cfg.search, seed),
        pruner=space.make_pruner(cfg, num_train if cfg.train.max_epochs is not None else None),
        directions=dirs,  # type: ignore[arg-type]
        load_if_exists=True,
    )
    if record is not None and remembered is None:
        study.set_user_attr(attrs.AUTOBATCH, record)
    names = list(cfg.search.objectives)
    if study.metric_names != names:  # optuna-dashboard and optuna.visualization label the objectives with these
        with quiet_experimental():
            study.set_metric_names(names)
    if study.user_attrs.get(attrs.FINGERPRINT) != fp:
        study.set_user_attr(attrs.FINGERPRINT, fp)
        study.set_user_attr(attrs.CONFIG, config_to_dict(cfg) | {"storage": None, "tracking_uri": None})
    return OpenStudy(study, cfg, seed, max_micro, num_train)


def _check_same_question(existing: optuna.Study, name: str, fp: str, dirs: list[str], *, force: bool) -> None:
    old = existing.user_attrs.get(attrs.FINGERPRINT)
    old = space.comparable(old) if old is not None else None
    old_dirs = [d.name.lower() for d in existing.directions]
    if (old is None or old == fp) and old_dirs == dirs:
        return
    if not force:
        what = space.describe_difference(old, fp) if old and old != fp else f"directions {old_dirs} → {dirs}"
        raise UserError(
            f"study {name!r} already exists with a different setup ({what}); "
            f"use a new name (--set study={name}-2) or --force to continue it anyway"
        )
    if old_dirs != dirs:
        raise UserError(
            f"study {name!r} optimizes {old_dirs}, not {dirs}; --force cannot change "
            "the objective of an existing study: use a new study name"
        )


def _refuse_lost_study(name: str, storage: optuna.storages.BaseStorage, tracker: Tracker, storage_label: str) -> None:
    """A new Optuna study whose MLflow experiment already holds trial runs: the study's storage
    was emptied or replaced (a journal cut to zero, another storage URL). Starting over would
    repeat trial numbers beside the old runs without a word."""
    from mlflow.entities.view_type import ViewType

    exp = tracker.client.get_experiment_by_name(name)
    if exp is None:
        return
    runs = tracker.client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TRIAL}` LIKE '%'", run_view_type=ViewType.ALL, max_results=1
    )
    if not runs:
        return
    known = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if name not in {s.study_name for s in known}:
        # (Checked again: a peer starting at the same moment may have created it meanwhile.)
        raise UserError(
            f"study {name!r} is not in the Optuna storage {storage_label}, but its "
            "MLflow experiment already has trial runs: the storage was emptied or replaced. Restore it, "
            f"run `batchscope doctor {name}`, use a new study name (--set study={name}-2), "
            "or --force to start a new study beside the old runs"
        )


def sweep_params(cfg: SweepConfig, storage_label: str) -> dict[str, Any]:
    """The params of the study's parent run in MLflow."""
    return {
        "study": cfg.study,
        "trainer": cfg.trainer.recipe,
        "model": cfg.trainer.model,
        "sampler": cfg.search.sampler,
        "pruner": cfg.search.pruner,
        "n_trials": cfg.search.n_trials,
        "objective": ",".join(cfg.search.objectives),
        "batch_sizes": cfg.search.batch_choices(),
        "lr_space": cfg.search.lr.model_dump(),
        "seeds": cfg.train.seeds,
        "storage": storage_label,
    }


def sweep_tags(study: str, commit: str | None) -> dict[str, str]:
    """The tags of the study's parent run in MLflow."""
    tags = {STUDY: study, "batchscope.version": batchscope.__version__}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def sweep_progress(study: optuna.Study, search: SearchConfig) -> tuple[int, dict[str, float]]:
    """The parent run's metrics, so that MLflow's runs table and charts show the sweep's state:
    trials finished (complete or pruned: what counts towards n_trials), of them complete, and the
    best objective so far (single objective); with the step to log them at (trials finished)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    values = {
        "sweep/trials_finished": float(len(done)),
        "sweep/trials_complete": float(sum(t.state == TrialState.COMPLETE for t in done)),
    }
    if len(study.directions) == 1:
        with contextlib.suppress(ValueError):  # no completed trial yet
            values[f"sweep/best_{search.objectives[0]}"] = float(study.best_value)
    return len(done), values


def git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
