"""Skip re-rendering a report whose inputs have not changed since it was written.

Rendering (analysis, fANOVA importances, eight matplotlib charts) is most of a report's time,
and it is a pure function of the loaded tables, the Optuna trials, the report's options and
the code that draws it. So the report folder keeps a digest of all of these (`KEY_FILE`),
written after every other file; a later report of the same inputs finds the same digest and
the files it would write already there, and writes nothing. Anything a sweep adds or changes
when it continues (a trial, a logged value, a state, a final metric) changes the digest, so a
resumed sweep's report is always rendered anew. The stores' file times are deliberately not
part of the key: logging the report itself to the sweep's run touches the MLflow store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pandas as pd

from batchscope.analysis.load import SweepData

KEY_FILE = ".report-key.json"
# Libraries whose version can change a chart's pixels or a number.
_LIBRARIES = ("matplotlib", "numpy", "optuna", "pandas", "scipy")


def report_key(sweeps: Sequence[SweepData], options: dict[str, object]) -> str:
    """A digest of everything a report is rendered from: each sweep, the options, the code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    for name in _LIBRARIES:
        digest.update(f"{name}={_version(name)};".encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for sweep in sweeps:
        _update_sweep(digest, sweep)
    return digest.hexdigest()


def is_current(folder: Path, key: str) -> bool:
    """Whether `folder` holds a complete report written from inputs with this key."""
    record = _read(folder)
    if record.get("key") != key:
        return False
    files = record.get("files")
    return isinstance(files, list) and all((folder / str(name)).is_file() for name in files)


def record(folder: Path, key: str) -> None:
    """Mark `folder`'s report as rendered from `key`: called once every file is written."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != KEY_FILE)
    (folder / KEY_FILE).write_text(json.dumps({"key": key, "files": files}, indent=1), encoding="utf-8")


def logged_run_ids(folder: Path, target: dict[str, object]) -> list[str] | None:
    """The run ids this very report was logged to at `target` (tracking URI, studies, artifact
    path), or None if it was not: then it is logged. A report rendered anew has no record yet
    (`forget` drops it), so its files are always logged again."""
    entry = _read(folder).get("logged")
    if not isinstance(entry, dict) or entry.get("target") != _digest(target):
        return None
    run_ids = entry.get("run_ids")
    return [str(r) for r in run_ids] if isinstance(run_ids, list) else None


def record_logged(folder: Path, target: dict[str, object], run_ids: list[str]) -> None:
    """Note that the report was logged to `run_ids`: logging the same files again is skipped
    (it costs a tracking client, about 1 s of MLflow imports and connection)."""
    current = _read(folder)
    if "key" in current:  # only a report with a record can be said to be unchanged later
        current["logged"] = {"target": _digest(target), "run_ids": run_ids}
        (folder / KEY_FILE).write_text(json.dumps(current, indent=1), encoding="utf-8")


def _digest(target: dict[str, object]) -> str:
    """Where a report was logged, as a hash: the tracking URI may hold a password, and the report
    folder is what people share."""
    return hashlib.sha256(json.dumps(target, sort_keys=True, default=str).encode()).hexdigest()


def _read(folder: Path) -> dict[str, object]:
    try:
        content = json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def forget(folder: Path) -> None:
    """Drop the mark before rewriting: a render that fails halfway must not leave a stale one."""
    (folder / KEY_FILE).unlink(missing_ok=True)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _update_sweep(digest: hashlib._Hash, sweep: SweepData) -> None:
    scalars = [
        sweep.study_name,
        sweep.directions,
        sweep.objective_names,
        sweep.tracking_uri,
        sweep.experiment_id,
        sweep.parent_run_id,
        sorted(sweep.sweep_params.items()),
        sorted(sweep.study.user_attrs.items()),
    ]
    digest.update(repr(scalars).encode())
    for frame in (sweep.trials, sweep.history, sweep.throughput):
        _update_frame(digest, frame)
    # The study itself: fANOVA importances read Optuna's params and values, not the tables.
    for trial in sweep.study.get_trials(deepcopy=False):
        digest.update(
            repr(
                (
                    trial.number,
                    trial.state.name,
                    trial.values,
                    sorted(trial.params.items()),
                    sorted((k, repr(d)) for k, d in trial.distributions.items()),
                    sorted(trial.user_attrs.items()),
                    sorted(trial.intermediate_values.items()),
                )
            ).encode()
        )


def _update_frame(digest: hashlib._Hash, frame: pd.DataFrame) -> None:
    digest.update(repr((list(frame.columns), [str(t) for t in frame.dtypes], frame.shape)).encode())
    if len(frame):
        # Row values and the index, column by column (object columns hash their str values).
        digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
