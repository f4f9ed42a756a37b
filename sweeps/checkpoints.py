"""A trial's checkpoints: where they are, which one a re-run resumes from, which are kept.

Layout: `<root>/checkpoints/<study>/trial-<number>-seed-<seed>.pt` (root: $BATCHSCOPE_ROOT,
else ./mlruns). A re-run (`retry_of`) resumes from its stopped trial's files; once a trial
has ended, `train.checkpoint.keep` decides whether its files stay, and kept final weights are
logged to the trial's runs as `weights/model.pt`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from batchscope.analysis.paths import safe_name
from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.config import CheckpointConfig
from batchscope.sweeps.store_setup import root_dir
from batchscope.sweeps.tracking import Tracker
from batchscope.sweeps.worker import WorkerDied
from batchscope.trainers.spec import CheckpointPolicy

# Writes a checkpoint's model weights to a file (the trial worker does it: torch is loaded there).
ExportWeights = Callable[[Path, Path], None]


def checkpoint_dir(study: str) -> Path:
    return root_dir() / "checkpoints" / safe_name(study)


def checkpoint_path(directory: Path, number: int, seed: int) -> Path:
    return directory / f"trial-{number}-seed-{seed}.pt"


@dataclass
class Checkpoints:
    """The checkpoints of one study's trials."""

    settings: CheckpointConfig
    seeds: list[int]
    directory: Path
    study: optuna.Study
    tracker: Tracker

    @property
    def enabled(self) -> bool:
        return self.settings.every_steps is not None or self.settings.every_minutes is not None

    def path(self, number: int, seed: int) -> Path:
        return checkpoint_path(self.directory, number, seed)

    def policy(self, trial: optuna.Trial, seed: int) -> CheckpointPolicy | None:
        c = self.settings
        if not self.enabled:
            return None
        retry_of = trial.user_attrs.get(attrs.RETRY_OF)
        resume = self.path(int(retry_of), seed) if retry_of is not None else None
        return CheckpointPolicy(
            self.path(trial.number, seed),
            every_steps=c.every_steps,
            every_seconds=c.every_minutes * 60 if c.every_minutes is not None else None,
            resume_from=resume,
        )

    def keep(
        self,
        trial: optuna.Trial,
        status: str,
        values: list[float] | None,
        run_ids: list[str],
        *,
        interrupted: bool,
        export: ExportWeights,
    ) -> None:
        """Apply `train.checkpoint.keep` once a trial has ended; log kept final weights to MLflow."""
        keep = self.settings.keep
        mine = [self.path(trial.number, s) for s in self.seeds]
        retry_of = trial.user_attrs.get(attrs.RETRY_OF)
        if retry_of is not None:  # the checkpoint this trial resumed from is no longer needed
            for s in self.seeds:
                self.path(int(retry_of), s).unlink(missing_ok=True)
        if status == "failed" and interrupted:
            return  # interrupted: its re-run resumes from these
        kept = status == "ok" and (keep == "all" or (keep == "best" and self._is_best(trial, values)))
        if kept:
            for path, run_id in zip(mine, run_ids, strict=False):
                self._log_weights(path, run_id, export)
            if keep == "best":
                previous = self.study.user_attrs.get(attrs.BEST_CHECKPOINT_TRIAL)
                if previous is not None and previous != trial.number:
                    for s in self.seeds:
                        self.path(int(previous), s).unlink(missing_ok=True)
                self.study.set_user_attr(attrs.BEST_CHECKPOINT_TRIAL, trial.number)
            return
        for path in mine:
            path.unlink(missing_ok=True)

    def _is_best(self, trial: optuna.Trial, values: list[float] | None) -> bool:
        if values is None:
            return False
        if len(self.study.directions) > 1:
            return True  # every trial may be on the Pareto front
        previous = [
            t.value
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != trial.number and t.value is not None
        ]
        if not previous:
            return True
        if self.study.direction == optuna.study.StudyDirection.MINIMIZE:
            return values[0] <= min(previous)
        return values[0] >= max(previous)

    def _log_weights(self, checkpoint: Path, run_id: str, export: ExportWeights) -> None:
        """Log the final weights (`weights/model.pt`, a state_dict) from a kept checkpoint."""
        if not checkpoint.exists():
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            try:
                # The slot's worker has torch loaded; importing it here would stall the sweep (seconds).
                export(checkpoint, path)
            except (WorkerDied, RuntimeError):
                from batchscope.trainers.checkpoint import export_weights

                export_weights(checkpoint, path)
            self.tracker.client.log_artifact(run_id, str(path), artifact_path="weights")
