"""Load a sweep from the stores (MLflow, Optuna) into pandas, fit, chart and report. Never imports trainers/.

The public entry points are re-exported here, imported on first use so that `import analysis`
stays cheap (matplotlib, MLflow and SQLAlchemy load only when a report or a load needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchscope.analysis.fits import fit_critical_batch, fit_lr_exponent
    from batchscope.analysis.load import SweepData, export_sweep, load_sweep
    from batchscope.analysis.report import build_report, log_report_artifacts, render_report

__all__ = [
    "SweepData",
    "build_report",
    "export_sweep",
    "fit_critical_batch",
    "fit_lr_exponent",
    "load_sweep",
    "log_report_artifacts",
    "render_report",
]

_HOME = {
    "SweepData": "batchscope.analysis.load",
    "load_sweep": "batchscope.analysis.load",
    "export_sweep": "batchscope.analysis.load",
    "fit_critical_batch": "batchscope.analysis.fits",
    "fit_lr_exponent": "batchscope.analysis.fits",
    "build_report": "batchscope.analysis.report",
    "render_report": "batchscope.analysis.report",
    "log_report_artifacts": "batchscope.analysis.report",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'batchscope.analysis' has no attribute {name!r}")
