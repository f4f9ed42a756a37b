"""The user attributes batchscope keeps on Optuna trials and studies: each key's one home.

Users read some of them (`mlflow_run_id`, `status`, `reason`: DESIGN.md, the tracking
contract); `batchscope status`, `doctor` and resumed sweeps read the rest.
"""

from __future__ import annotations

# ---- on each trial ----
# The process running it, `host:pid` (sweeps.owners): a trial whose worker is gone is re-run.
WORKER = "worker"
# The sampler seed of the sweep that ran it (a peer's sampler is seeded differently).
SAMPLER_SEED = "sampler_seed"
# Its first MLflow run, and all of them (one per seed).
MLFLOW_RUN_ID = "mlflow_run_id"
MLFLOW_RUN_IDS = "mlflow_run_ids"
# How it ended (ok, pruned, diverged, oom, failed) and why, as on its runs' tags.
STATUS = "status"
REASON = "reason"
# The number of the stopped trial that this one re-runs with the same parameters.
RETRY_OF = "retry_of"
# Headline final values averaged over seeds (`final/<name>` in MLflow), for `batchscope status`.
FINAL_SUMMARY = ("steps_to_target", "best_val_acc", "val_loss")
# Steps to the target of the trial's first seed alone: the seed whose curve the pruner watches
# (sweeps.frontier_pruner compares like with like; the objective is the mean over seeds).
FIRST_SEED_STEPS = "first_seed_steps_to_target"

# ---- on the study ----
# What the study asks (sweeps.space.fingerprint): a changed config is refused without --force.
FINGERPRINT = "batchscope.fingerprint"
# The config it was created with, stores left out.
CONFIG = "batchscope.config"
# AutoBatch's measurement for `auto` batch sizes (sweeps.memory), remembered so a resume keeps it.
AUTOBATCH = "batchscope.autobatch"
# The trial whose checkpoints `train.checkpoint.keep: best` keeps.
BEST_CHECKPOINT_TRIAL = "batchscope.best_checkpoint_trial"
