"""Training recipes, the training loop and its measurements. Imports neither optuna nor mlflow."""

from batchscope.trainers import schedule  # noqa: F401  (re-exported for sweeps)
