"""Training recipes, the training loop and its measurements. Imports neither optuna nor mlflow."""

__version__ = "0.1.0"

from trainers import schedule  # noqa: F401  (re-exported for sweeps)
