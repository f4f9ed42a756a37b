"""batchscope: which batch size, with which learning rate, and what does it cost?

The Python API, in the order a notebook uses it (docs/python.md walks through it)::

    import batchscope

    result = batchscope.sweep("sweep.yaml", overrides={"train.max_steps": 300}, n_trials=12)
    data = result.load()  # or batchscope.load("my-study"): pandas tables
    data.trials[["batch_size", "lr", "status", "objective"]]
    batchscope.report("my-study")  # -> reports/my-study/index.html
    batchscope.noise_scale(model, loss_fn, x, y)  # B_simple of any model, at its current weights
    batchscope.autobatch("sweep.yaml").batch_size  # the largest batch that fits in memory

Installed as one namespace: `batchscope.sweeps` (configs, Optuna studies, MLflow tracking, the
CLI), `batchscope.trainers` (the PyTorch training loop and its measurements) and
`batchscope.analysis` (stores → tables, fits, charts, the report). In the repository they are
the top-level folders `sweeps/`, `trainers/` and `analysis/`, mapped by pyproject.toml.

`import batchscope` stays cheap (no torch, optuna or mlflow): the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchscope._measure import autobatch, noise_scale
    from batchscope._results import load, report
    from batchscope._sweep import SweepResult, sweep
    from batchscope.analysis.load import SweepData
    from batchscope.sweeps.errors import UserError
    from batchscope.trainers.autobatch import AutoBatchResult
    from batchscope.trainers.noise_scale_offline import NoiseScaleEstimate

# The version's one source: pyproject.toml reads it from here, `batchscope --version` prints it.
__version__ = "0.2.0"

__all__ = [
    "AutoBatchResult",
    "NoiseScaleEstimate",
    "SweepData",
    "SweepResult",
    "UserError",
    "__version__",
    "autobatch",
    "load",
    "noise_scale",
    "report",
    "sweep",
]

_HOME = {
    "sweep": "batchscope._sweep",
    "SweepResult": "batchscope._sweep",
    "load": "batchscope._results",
    "report": "batchscope._results",
    "noise_scale": "batchscope._measure",
    "autobatch": "batchscope._measure",
    "SweepData": "batchscope.analysis.load",
    "UserError": "batchscope.sweeps.errors",
    "AutoBatchResult": "batchscope.trainers.autobatch",
    "NoiseScaleEstimate": "batchscope.trainers.noise_scale_offline",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'batchscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
