"""`batchscope.load` and `batchscope.report`: a sweep's tables and its report, from its stores."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batchscope._common import local_root, user_errors

if TYPE_CHECKING:
    from batchscope.analysis.load import SweepData


@user_errors
def load(
    study: str,
    root: str | os.PathLike[str] | None = None,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
) -> SweepData:
    """Read a study from its stores into pandas: what `batchscope export` writes out.

    `SweepData.trials` has one row per trial and seed (batch_size, lr, status, objective,
    the `final/*` metrics...), `SweepData.history` every logged value of every learning
    curve in long form (run_id, trial, batch_size, lr, key, step, value...), and
    `SweepData.study` is the Optuna study itself.

    Args:
        study: the study's name (the config's `study:`).
        root: the local store folder (default: $BATCHSCOPE_ROOT, else ./mlruns), found as the
            CLI finds it.
        storage, tracking_uri: stores elsewhere (an Optuna storage URL or journal file, an MLflow
            tracking URI), as the CLI's --storage and --tracking-uri.

    Raises:
        UserError: no such study, or a store that is missing or cannot be read (one line).
    """
    if not isinstance(study, str) or not study:
        raise ValueError(f"study must be a study's name, but got {study=}.")
    with local_root(root):
        from batchscope.sweeps.commands import load_data

        return load_data(study, storage=storage, tracking_uri=tracking_uri)


@user_errors
def report(
    study: str | Sequence[str],
    root: str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] = "reports",
    storage: str | None = None,
    tracking_uri: str | None = None,
    svg: bool = False,
    log: bool = True,
    ui_url: str | None = None,
) -> Path:
    """Write a study's report (HTML and Markdown, with charts): what `batchscope report` writes.

    Args:
        study: a study's name, or several names to compare side by side.
        root, storage, tracking_uri: where the stores are, as for `batchscope.load`.
        out_dir: the folder the report's own folder is made in (default ./reports).
        svg: charts as SVG instead of PNG.
        log: also log the report to each study's sweep run in MLflow.
        ui_url: the MLflow UI's address, for the report's links to runs (default http://127.0.0.1:5000).

    Returns:
        The path of the report's index.html (summary.md and the charts are beside it).
    """
    studies = [study] if isinstance(study, str) else list(study)
    if not studies or not all(isinstance(s, str) and s for s in studies):
        raise ValueError(f"study must be a study's name or a list of names, but got {study=}.")
    from batchscope.sweeps.locations import check_output_folder

    check_output_folder(os.fspath(out_dir), "out_dir")  # named as here (write_report names the CLI's --out)
    with local_root(root):
        from batchscope.analysis.readonly_stores import DEFAULT_TRACKING_UI
        from batchscope.sweeps.commands import write_report

        return write_report(
            studies,
            storage=storage,
            tracking_uri=tracking_uri,
            out=os.fspath(out_dir),
            ui_url=DEFAULT_TRACKING_UI if ui_url is None else ui_url,
            svg=svg,
            log=log,
        )
