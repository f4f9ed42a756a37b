"""batchscope: which batch size, with which learning rate, and what does it cost?

Installed as one namespace: `batchscope.sweeps` (configs, Optuna studies, MLflow tracking, the
CLI), `batchscope.trainers` (the PyTorch training loop and its measurements) and
`batchscope.analysis` (stores → tables, fits, charts, the report). In the repository they are
the top-level folders `sweeps/`, `trainers/` and `analysis/`, mapped by pyproject.toml.

`import batchscope` stays cheap (no torch, optuna or mlflow): the rest loads on first use.
"""

from __future__ import annotations

# The version's one source: pyproject.toml reads it from here, `batchscope --version` prints it.
__version__ = "0.2.0"

__all__ = ["__version__"]
