"""Load a finished (or running) sweep from its stores into two pandas tables.

`trials`: one row per MLflow child run (trial × seed). Columns, each from one place:
- trial, seed, run_id, batch_size (effective), lr (base), state (Optuna's), status, reason;
- objective, objective_1, ...: Optuna's values of the trial (NaN unless it completed);
- final/*: the run's final metrics;
- the child run's params under their own names (micro_batch_size, effective_lr, ...); a param
  whose name is taken by a column above keeps its `param:` prefix.
The sweep's parent run's params are `SweepData.sweep_params`, never trial columns. An Optuna
trial with no child run (it failed before training started) still gets one row, with no run id.

`history`: every logged value of every non-final metric, in long form:
run_id, trial, seed, batch_size, lr, key, step, value, timestamp (ms), time_s (seconds since
the run's first logged value).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import optuna
import pandas as pd

from batchscope import contract
from batchscope.analysis import _mlflow_raw
from batchscope.analysis.paths import safe_name
from batchscope.analysis.readonly_stores import (
    StorageLike,
    is_sql_tracking_uri,
    local_stores,
    open_optuna_storage,
    redact_url,
)

ReadMethod = Literal["auto", "sql", "client"]

# Contract tag names, and the trials columns they become.
_TAG_COLUMNS = {
    contract.ROLE: "role",
    contract.PARENT_RUN: "parent_run_id",
    contract.STUDY: "study",
    contract.TRIAL: "trial",
    contract.SEED: "seed",
    contract.STATUS: "status",
    contract.REASON: "reason",
}
_STATE_TO_STATUS = {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "failed"}

HISTORY_COLUMNS = [
    "run_id",
    "trial",
    "seed",
    "batch_size",
    "lr",
    "key",
    "step",
    "value",
    "timestamp",
    "time_s",
]


THROUGHPUT_COLUMNS = ["run_id", "batch_size", "samples_per_s", "latency_p50_ms", "latency_p95_ms"]


@dataclass(frozen=True)
class SweepData:
    """One study read back from Optuna and MLflow."""

    study_name: str
    directions: tuple[str, ...]  # "minimize" / "maximize", one per objective
    objective_names: tuple[str, ...]  # study.metric_names, or "objective", "objective_1", ...
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str | None
    trials: pd.DataFrame
    history: pd.DataFrame
    study: optuna.Study
    # The sweep's own settings: params of its parent MLflow run (never trial columns).
    sweep_params: dict[str, str] = field(default_factory=dict)
    # Inference throughput runs (`batchscope throughput`): batch_size, samples_per_s, latency_p50_ms, latency_p95_ms
    throughput: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=THROUGHPUT_COLUMNS))

    @property
    def minimize(self) -> bool:
        """Whether the first (reported) objective is minimized."""
        return self.directions[0] == "minimize"


def load_sweep(
    study_name: str,
    *,
    storage: StorageLike | None = None,
    tracking_uri: str | None = None,
    method: ReadMethod = "auto",
) -> SweepData:
    """Read one study: Optuna trials from `storage`, runs and histories from `tracking_uri`.

    Either left out is the local store's, as the CLI finds it: under $BATCHSCOPE_ROOT, else ./mlruns.

    `method="auto"` reads MLflow's tables directly for database URIs (a few queries whatever
    the sweep's size) and goes through MlflowClient otherwise (tracking servers).
    """
    if method not in ("auto", "sql", "client"):
        raise ValueError(f"method must be 'auto', 'sql' or 'client', but got {method=}.")
    if storage is None or tracking_uri is None:
        local_journal, local_tracking = local_stores()
        storage = local_journal if storage is None else storage
        tracking_uri = local_tracking if tracking_uri is None else tracking_uri
    study = _load_study(study_name, storage)
    use_sql = method == "sql" or (method == "auto" and is_sql_tracking_uri(tracking_uri))
    if use_sql:
        raw = _mlflow_raw.read_sql(tracking_uri, study_name)
    else:
        raw = _mlflow_raw.read_client(tracking_uri, study_name)
    if raw.experiment_id is None:
        warnings.warn(
            f"No MLflow experiment named {study_name!r} at {redact_url(tracking_uri)}: "
            "only Optuna's trials are available.",
            stacklevel=2,
        )

    run_info = _run_table(raw)
    parent_run_id = _parent_run_id(run_info, study_name)
    sweep_params = _run_params(raw.params, parent_run_id)
    objective_names = _objective_names(study, sweep_params.get("objective"))
    optuna_trials = _optuna_trials(study, objective_names)
    children = run_info[run_info["role"] == "trial"] if "role" in run_info else run_info.iloc[:0]
    trials = _trials_table(children, raw, optuna_trials)
    history = _history_table(raw.metrics, trials)
    throughput = _throughput_table(run_info, raw.metrics)
    return SweepData(
        study_name=study_name,
        directions=tuple(d.name.lower() for d in study.directions),
        objective_names=objective_names,
        tracking_uri=tracking_uri,
        experiment_id=raw.experiment_id,
        parent_run_id=parent_run_id,
        trials=trials,
        history=history,
        study=study,
        sweep_params=sweep_params,
        throughput=throughput,
    )


def export_sweep(sweep: SweepData, out_dir: Path, *, file_format: Literal["parquet", "csv"] = "parquet") -> list[Path]:
    """Write `trials` and `history` to `out_dir/<safe-study-name>_{trials,history}.<format>`."""
    if file_format not in ("parquet", "csv"):
        raise ValueError(f"file_format must be 'parquet' or 'csv', but got {file_format=}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for table_name, table in (("trials", sweep.trials), ("history", sweep.history)):
        path = out_dir / f"{safe_name(sweep.study_name)}_{table_name}.{file_format}"
        if file_format == "parquet":
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False)
        paths.append(path)
    return paths


# --- Optuna ---------------------------------------------------------------------------------


def _load_study(study_name: str, storage: StorageLike) -> optuna.Study:
    opened = open_optuna_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        known = optuna.get_all_study_names(opened)
        where = redact_url(str(storage)) if isinstance(storage, str | Path) else type(storage).__name__
        raise LookupError(f"No Optuna study named {study_name!r} in {where}; it holds {known}.") from None
    return _snapshot(study)


def _snapshot(study: optuna.Study) -> optuna.Study:
    """The study as read now, in memory. Everything the analysis reads then agrees with the trials
    table while a sweep goes on adding trials, and the report's forked processes (analysis/_fork.py)
    never use the parent's database connection (a PostgreSQL socket shared by two processes
    interleaves their messages)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        snapshot = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(), study_name=study.study_name, directions=study.directions
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    for key, value in study.user_attrs.items():
        snapshot.set_user_attr(key, value)
    if study.metric_names is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            snapshot.set_metric_names(study.metric_names)
    snapshot.add_trials(study.get_trials(deepcopy=False))
    return snapshot


def _objective_names(study: optuna.Study, from_sweep: str | None) -> tuple[str, ...]:
    """Optuna's metric names; else the sweep's objectives (its parent run's `objective` param,
    comma-separated); else "objective", "objective_1", ..."""
    if study.metric_names:
        return tuple(study.metric_names)
    names = tuple(from_sweep.split(",")) if from_sweep else ()
    if len(names) == len(study.directions):
        return names
    return tuple(_objective_column(i) for i in range(len(study.directions)))


def _objective_column(index: int) -> str:
    """trials column of objective `index`: "objective", then "objective_1", "objective_2"..."""
    return "objective" if index == 0 else f"objective_{index}"


def _optuna_trials(study: optuna.Study, objective_names: tuple[str, ...]) -> pd.DataFrame:
    """One row per Optuna trial: number, state, objective value(s), params, status, reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values or [np.nan] * len(objective_names)
        row: dict[str, object] = {
            "trial": trial.number,
            "state": trial.state.name,
            **{f"optuna_{k}": v for k, v in trial.params.items()},
            **{_objective_column(i): v for i, v in enumerate(values)},
            "optuna_status": trial.user_attrs.get("status"),
            "optuna_reason": trial.user_attrs.get("reason"),
            "trial_duration_s": (
                (trial.datetime_complete - trial.datetime_start).total_seconds()
                if trial.datetime_complete and trial.datetime_start
                else np.nan
            ),
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=["trial", "state", "objective"])
    frame["objective"] = pd.to_numeric(frame["objective"], errors="coerce")
    return frame


# --- MLflow ---------------------------------------------------------------------------------


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    """run_id/key/value rows → one row per run_id, one column per key."""
    if long.empty:
        return pd.DataFrame(index=pd.Index([], name="run_id"))
    return long.drop_duplicates(["run_id", "key"], keep="last").pivot(index="run_id", columns="key", values="value")


def _numeric_where_possible(frame: pd.DataFrame) -> pd.DataFrame:
    """Params are stored as text; turn the columns whose every value is a number into numbers."""
    for column in frame.columns:
        converted = pd.to_numeric(frame[column], errors="coerce")
        if converted.notna().sum() == frame[column].notna().sum():
            frame[column] = converted
    return frame


def _run_table(raw: _mlflow_raw.RawExperiment) -> pd.DataFrame:
    """runs + contract tags, one row per run id."""
    tags = _wide(raw.tags[raw.tags["key"].isin(_TAG_COLUMNS.keys())])
    tags = tags.rename(columns=_TAG_COLUMNS)
    runs = raw.runs.set_index("run_id").join(tags, how="left")
    return runs.reset_index()


def _throughput_table(run_info: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The latest inference-throughput run: one row per batch size (the metric step)."""
    if "role" not in run_info:
        return pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    runs = run_info[run_info["role"] == "throughput"]
    if runs.empty:
        return pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    latest = str(runs.sort_values("start_time")["run_id"].iloc[-1])
    rows = metrics[(metrics["run_id"] == latest) & metrics["key"].astype(str).str.startswith("infer/")]
    if rows.empty:
        return pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    wide = rows.pivot_table(index="step", columns="key", values="value", aggfunc="last")
    wide.columns = [str(c).removeprefix("infer/") for c in wide.columns]
    wide = wide.reset_index().rename(columns={"step": "batch_size"})
    wide.insert(0, "run_id", latest)
    return wide.reindex(columns=THROUGHPUT_COLUMNS)


def _parent_run_id(run_info: pd.DataFrame, study_name: str) -> str | None:
    if "role" not in run_info:
        return None
    parents = run_info[run_info["role"] == contract.SWEEP_ROLE]
    if "study" in parents:
        named = parents[parents["study"] == study_name]
        parents = named if not named.empty else parents
    if parents.empty:
        return None
    # The oldest, as the sweep and the report pick it (batchscope.contract.sweep_run): a resumed
    # sweep takes up its parent run again, so several exist only if two sweeps started at once.
    return str(parents.sort_values("start_time")["run_id"].iloc[0])


def _run_params(params: pd.DataFrame, run_id: str | None) -> dict[str, str]:
    if run_id is None:
        return {}
    rows = params[params["run_id"] == run_id]
    return {str(k): str(v) for k, v in zip(rows["key"], rows["value"], strict=True)}


def _trials_table(children: pd.DataFrame, raw: _mlflow_raw.RawExperiment, optuna_trials: pd.DataFrame) -> pd.DataFrame:
    # Only the child runs' own params: the parent run's (e.g. its `objective`, the sweep's objective
    # names) would otherwise become all-empty trial columns that shadow Optuna's values.
    child_params = raw.params[raw.params["run_id"].isin(children["run_id"])]
    params = _numeric_where_possible(_wide(child_params)).add_prefix("param:")
    finals = _wide(raw.finals).astype(float)
    runs = children.set_index("run_id").join(params, how="left").join(finals, how="left")
    runs = runs.reset_index()
    for column in ("trial", "seed"):
        if column not in runs:
            runs[column] = np.nan
        if "param:seed" in runs and column == "seed":
            runs[column] = runs[column].fillna(runs["param:seed"])
        runs[column] = pd.to_numeric(runs[column], errors="coerce").astype("Int64")
    optuna_trials = optuna_trials.astype({"trial": "Int64"})
    trials = runs.merge(optuna_trials, on="trial", how="outer", sort=False)

    # Effective batch size and base lr come from the run; Optuna's params fill the rest.
    for name in ("batch_size", "lr"):
        from_run = trials.get(f"param:{name}", np.nan)
        from_optuna = trials.get(f"optuna_{name}", np.nan)
        trials[name] = pd.to_numeric(pd.Series(from_run, index=trials.index), errors="coerce")
        trials[name] = trials[name].fillna(pd.to_numeric(pd.Series(from_optuna, index=trials.index), errors="coerce"))
    trials["batch_size"] = trials["batch_size"].round().astype("Int64")
    trials["status"] = _status(trials)
    trials["reason"] = _first_text(trials, "reason", "optuna_reason")
    # The params already merged into the columns above must not come back under the same name.
    merged = [f"param:{name}" for name in ("batch_size", "lr", "seed")]
    trials = trials.drop(columns=[c for c in merged if c in trials])
    trials = trials.rename(columns=_param_column(set(trials.columns)))
    leading = ["trial", "seed", "run_id", "batch_size", "lr", "state", "status", "reason"]
    objectives = [c for c in trials.columns if c.startswith("objective")]
    finals_cols = sorted(c for c in trials.columns if c.startswith(_mlflow_raw.FINAL_PREFIX))
    rest = [
        c
        for c in trials.columns
        if c not in leading + objectives + finals_cols + ["role", "study", "optuna_status"]
        and not c.startswith("optuna_")
    ]
    trials = trials[leading + objectives + finals_cols + rest]
    return trials.sort_values(["trial", "seed"], na_position="last").reset_index(drop=True)


def _param_column(taken: set[str]) -> dict[str, str]:
    """`param:name` → `name`, unless a column of that name exists already (Optuna's `objective`,
    the `status` tag, ...): such a param keeps its `param:` prefix rather than hide either value."""
    names = {c: c.removeprefix("param:") for c in taken if c.startswith("param:")}
    return {c: name for c, name in names.items() if name not in taken}


def _first_text(trials: pd.DataFrame, *columns: str) -> pd.Series:
    out = pd.Series("", index=trials.index, dtype=object)
    for column in reversed(columns):
        if column in trials:
            values = trials[column]
            present = values.notna() & (values.astype(str) != "")
            out = out.where(~present, values.astype(str))
    return out


def _status(trials: pd.DataFrame) -> pd.Series:
    """The run's batchscope.status tag, else the trial's status attr, else from Optuna's state."""
    from_state = trials["state"].map(_STATE_TO_STATUS) if "state" in trials else None
    status = _first_text(trials, "status", "optuna_status")
    if from_state is not None:
        status = status.where(status != "", from_state.fillna("running"))
    return status.replace("", "unknown")


def _history_table(metrics: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Long-form histories of the child runs, labelled with trial, seed, batch size and lr."""
    runs = trials.dropna(subset=["run_id"]).drop_duplicates("run_id").set_index("run_id")
    metrics = metrics[metrics["run_id"].isin(runs.index)]
    if metrics.empty:
        return pd.DataFrame(
            {
                "run_id": pd.Series(dtype="category"),
                "trial": pd.Series(dtype="Int64"),
                "seed": pd.Series(dtype="Int64"),
                "batch_size": pd.Series(dtype="Int64"),
                "lr": pd.Series(dtype=float),
                "key": pd.Series(dtype="category"),
                "step": pd.Series(dtype="int64"),
                "value": pd.Series(dtype=float),
                "timestamp": pd.Series(dtype="int64"),
                "time_s": pd.Series(dtype=float),
            }
        )
    # Categorical codes make the per-row lookups below cheap on millions of rows.
    run_id = pd.Categorical(metrics["run_id"])
    per_run = runs.reindex(run_id.categories)
    codes = run_id.codes
    history = pd.DataFrame(
        {
            "run_id": run_id,
            "trial": pd.array(per_run["trial"].to_numpy()[codes], dtype="Int64"),
            "seed": pd.array(per_run["seed"].to_numpy()[codes], dtype="Int64"),
            "batch_size": pd.array(per_run["batch_size"].to_numpy()[codes], dtype="Int64"),
            "lr": per_run["lr"].to_numpy(dtype=float)[codes],
            "key": pd.Categorical(metrics["key"]),
            "step": metrics["step"].to_numpy(dtype=np.int64),
            "value": metrics["value"].to_numpy(dtype=float),
            "timestamp": metrics["timestamp"].to_numpy(dtype=np.int64),
        }
    )
    # Seconds since the run's first logged value: the run is created before its worker has
    # built the model and data, and that set-up is not training time.
    first_ms = history.groupby("run_id", sort=False, observed=True)["timestamp"].transform("min")
    history["time_s"] = (history["timestamp"].to_numpy() - first_ms.to_numpy()) / 1000.0
    return history.sort_values(["trial", "seed", "key", "step"], kind="stable").reset_index(drop=True)
