"""`batchscope.sweep`: run (or continue) a sweep from Python, as `batchscope sweep` does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscope._common import ConfigLike, Overrides, local_root, read_config, user_errors
from batchscope.sweeps.errors import UserError

if TYPE_CHECKING:
    import optuna

    from batchscope.analysis.load import SweepData
    from batchscope.sweeps.store_setup import Stores


@dataclass(frozen=True)
class SweepResult:
    """What a sweep left behind, and where.

    Attributes:
        study_name: the Optuna study's name, which is also the MLflow experiment's.
        completed: trials of the study that finished (ok or pruned), this call's and earlier ones'.
        total: the trials the study was run to (`n_trials`, else the config's search.n_trials).
        directions: "minimize" / "maximize", one per objective.
        best_trials: Optuna's best trial (one objective) or its Pareto front (several);
            empty when no trial completed.
        report_path: the report's index.html, or None when none was written (report=False,
            report.auto false in the config, or the report failed: a line on stderr says why).
        storage: the Optuna storage, without its password.
        tracking_uri: the MLflow tracking URI, without its password.
        experiment_id, parent_run_id: the study's MLflow experiment and the sweep's parent run.
    """

    study_name: str
    completed: int
    total: int
    directions: tuple[str, ...]
    best_trials: tuple[optuna.trial.FrozenTrial, ...] = field(repr=False)
    report_path: Path | None
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    # The stores as resolved for this sweep (with their credentials): what load() reads.
    _stores: Stores = field(repr=False, compare=False)

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        """The best trial of a single-objective study (None before any trial completed)."""
        if len(self.directions) > 1:
            raise ValueError(
                f"study {self.study_name!r} has {len(self.directions)} objectives: use best_trials (its Pareto front)."
            )
        return self.best_trials[0] if self.best_trials else None

    def load(self) -> SweepData:
        """The sweep's tables (see `batchscope.load`), read from the stores it was run on."""
        from batchscope._results import load

        return load(self.study_name, storage=self._stores.storage_url, tracking_uri=self._stores.tracking_uri)


@user_errors
def sweep(
    config: ConfigLike,
    *,
    overrides: Overrides = None,
    n_trials: int | None = None,
    workers: int | None = None,
    report: bool = True,
    root: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> SweepResult:
    """Run a batch-size × learning-rate sweep, or continue one: what `batchscope sweep` does.

    Trials run in worker processes that never re-import the caller's main module, so this
    works from a script without an ``if __name__ == "__main__":`` guard and from a Jupyter
    notebook. Progress is shown on stderr (a live display in a terminal or in Jupyter).

    Args:
        config: a sweep YAML's path, or the same config as a dict.
        overrides: config keys to change, as `--set` does: ``{"train.max_steps": 300}`` or
            ``["train.max_steps=300"]``.
        n_trials: the study's total trials (default: the config's search.n_trials). Trials a
            previous call finished count: calling again with the same config continues.
        workers: trials run at a time on this machine (default 1).
        report: write the report at the end (under the config's report.out_dir, default
            ./reports), unless the config's report.auto is false.
        root: the local store folder (default: $BATCHSCOPE_ROOT, else ./mlruns); stores given
            in the config (storage, tracking_uri) are used as they are.
        force: continue a study even though its config changed.

    Raises:
        UserError: a config, store or argument the caller must fix; its message is one line
            naming what and how.
    """
    from batchscope.sweeps.cli import max_workers
    from batchscope.sweeps.config_bounds import MAX_TRIALS

    workers = 1 if workers is None else workers
    if not isinstance(workers, int) or not 1 <= workers <= max_workers():
        raise ValueError(f"workers must be from 1 to {max_workers()} (4 per CPU core here), but got {workers=}.")
    if n_trials is not None and (not isinstance(n_trials, int) or not 1 <= n_trials <= MAX_TRIALS):
        raise ValueError(f"n_trials must be from 1 to {MAX_TRIALS:,}, but got {n_trials=}.")
    with local_root(root):
        cfg = read_config(config, overrides)  # checked before any worker starts
        if cfg.trainer.recipe.startswith("__main__:"):
            # The workers do not run the caller's script (sweeps/spawning.py), so nothing defined in it exists there.
            raise UserError(
                f"recipe {cfg.trainer.recipe!r}: trials run in worker processes that do not run your script "
                "or notebook; put the recipe in a module next to it (e.g. myrecipes.py) and name it 'myrecipes:build'"
            )
        from batchscope.sweeps import commands

        opened = commands.open_sweep(cfg, workers=workers, force=force)
        summary = commands.run_with_progress(opened, n_trials, workers)
        report_path = commands.write_sweep_report(opened) if report and cfg.report.auto else None
        return SweepResult(
            study_name=cfg.study,
            completed=summary.completed,
            total=summary.total,
            directions=tuple(d.name.lower() for d in opened.study.directions),
            best_trials=_best_trials(opened.study),
            report_path=report_path,
            storage=opened.stores.storage_label,
            tracking_uri=_redacted(opened.stores.tracking_uri),
            experiment_id=summary.experiment_id,
            parent_run_id=summary.parent_run_id,
            _stores=opened.stores,
        )


def _best_trials(study: Any) -> tuple[optuna.trial.FrozenTrial, ...]:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return ()
    if len(study.directions) > 1:
        return tuple(study.best_trials)  # the Pareto front
    return (study.best_trial,)


def _redacted(url: str) -> str:
    from batchscope.sweeps.locations import redact

    return redact(url)
