"""load_sweep / export_sweep against real stores written by the synthetic sweep."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from batchscope.analysis.load import HISTORY_COLUMNS, export_sweep, load_sweep
from tests.analysis_tests.conftest import Stores, make_optuna_only_study


@pytest.fixture(scope="module")
def main(stores: Stores):
    return load_sweep("main", storage=stores.storage, tracking_uri=stores.tracking_uri)


def test_trials_has_one_row_per_child_run(stores: Stores, main):
    synthetic = stores.sweeps["main"]

    assert len(main.trials) == len(synthetic.run_ids)
    assert set(main.trials["run_id"]) == set(synthetic.run_ids)
    assert main.trials["trial"].nunique() == synthetic.n_trials
    # Every trial ran every seed.
    assert (main.trials.groupby("trial")["seed"].nunique() == len(synthetic.spec.seeds)).all()
    assert main.experiment_id == synthetic.experiment_id
    assert main.parent_run_id == synthetic.parent_run_id
    assert main.directions == ("minimize",)


def test_trials_columns_follow_the_contract(main):
    expected = {
        "trial", "seed", "run_id", "batch_size", "lr", "state", "status", "reason", "objective",
        "micro_batch_size", "accum_steps", "effective_lr", "optimizer", "max_steps", "lr_scaling",
        "final/val_loss", "final/train_loss", "final/gen_gap", "final/sharpness",
        "final/steps_to_target", "final/samples_to_target", "final/time_to_target_s", "final/wall_s",
    }  # fmt: skip
    assert expected <= set(main.trials.columns)
    assert str(main.trials["batch_size"].dtype) == "Int64"
    assert str(main.trials["seed"].dtype) == "Int64"
    assert main.trials["lr"].dtype == float
    assert not main.trials.columns.duplicated().any()


def test_trial_values_match_what_mlflow_holds(stores: Stores, main):
    client = MlflowClient(stores.tracking_uri)
    row = main.trials[main.trials["status"] == "ok"].iloc[0]
    run = client.get_run(row["run_id"])

    assert row["final/val_loss"] == pytest.approx(run.data.metrics["final/val_loss"])
    assert row["batch_size"] == int(run.data.params["batch_size"])
    assert row["lr"] == pytest.approx(float(run.data.params["lr"]))
    assert row["seed"] == int(run.data.tags["batchscope.seed"])
    assert row["trial"] == int(run.data.tags["optuna.trial_number"])
    assert row["run_status"] == "FINISHED"


def test_optuna_state_and_objective_are_joined(stores: Stores, main):
    study = optuna.load_study(study_name="main", storage=stores.storage)
    by_number = {t.number: t for t in study.trials}
    for row in main.trials.itertuples():
        trial = by_number[row.trial]
        assert row.state == trial.state.name
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert row.objective == pytest.approx(trial.value)
        else:
            assert math.isnan(row.objective)
    # Status comes from the run's tag: diverged trials are FAIL in Optuna, "diverged" here.
    diverged = main.trials[main.trials["status"] == "diverged"]
    assert not diverged.empty
    assert set(diverged["state"]) == {"FAIL"}
    assert diverged["reason"].str.contains("nan").all()


def test_history_is_long_form_with_labels(stores: Stores, main):
    spec = stores.sweeps["main"].spec
    history = main.history

    assert list(history.columns) == HISTORY_COLUMNS
    ok = main.trials[main.trials["status"] == "ok"].iloc[0]
    train = history[(history["run_id"] == ok["run_id"]) & (history["key"] == "train/loss")]
    assert len(train) == spec.max_steps // spec.train_loss_every + 1  # and the last step
    assert set(train["batch_size"]) == {ok["batch_size"]}
    assert set(train["trial"]) == {ok["trial"]} and set(train["seed"]) == {ok["seed"]}
    assert (train["time_s"] >= 0).all()  # seconds since the run's first logged value
    val = history[(history["run_id"] == ok["run_id"]) & (history["key"] == "val/loss")]
    assert len(val) == spec.max_steps // spec.eval_every
    # Final metrics live in trials, not in history.
    assert not history["key"].astype(str).str.startswith("final/").any()


def test_history_values_match_mlflow(stores: Stores, main):
    client = MlflowClient(stores.tracking_uri)
    run_id = main.trials[main.trials["status"] == "ok"]["run_id"].iloc[-1]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "gns/b_simple"))
    loaded = main.history[(main.history["run_id"] == run_id) & (main.history["key"] == "gns/b_simple")]

    np.testing.assert_array_equal(loaded["step"].to_numpy(), [s for s, _ in logged])
    np.testing.assert_allclose(loaded["value"].to_numpy(), [v for _, v in logged])


def test_nan_values_survive_the_sql_store(main):
    # Diverged runs log a NaN train loss last; MLflow's SQL store keeps it as 0 + is_nan.
    diverged = main.trials[main.trials["status"] == "diverged"]["run_id"]
    train = main.history[main.history["run_id"].isin(diverged) & (main.history["key"] == "train/loss")]
    last = train.sort_values("step").groupby("run_id", observed=True)["value"].nth(-1)
    assert len(last) == len(diverged)
    assert last.isna().all()


def test_sql_and_client_readers_agree(stores: Stores):
    by_sql = load_sweep("wide", storage=stores.storage, tracking_uri=stores.tracking_uri, method="sql")
    by_client = load_sweep("wide", storage=stores.storage, tracking_uri=stores.tracking_uri, method="client")

    def ordered(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        frame = frame.astype({c: str for c in ("run_id", "key") if c in frame})
        return frame.sort_values(keys).reset_index(drop=True)

    pd.testing.assert_frame_equal(
        ordered(by_sql.trials, ["trial", "seed"]), ordered(by_client.trials, ["trial", "seed"]), check_dtype=False
    )
    pd.testing.assert_frame_equal(
        ordered(by_sql.history, ["run_id", "key", "step"]),
        ordered(by_client.history, ["run_id", "key", "step"]),
        check_dtype=False,
    )


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_writes_both_tables(tmp_path, main, file_format):
    paths = export_sweep(main, tmp_path, file_format=file_format)

    assert [p.name for p in paths] == [f"main_trials.{file_format}", f"main_history.{file_format}"]
    read = pd.read_csv if file_format == "csv" else pd.read_parquet
    trials, history = (read(p) for p in paths)
    assert trials.shape == main.trials.shape
    assert history.shape == main.history.shape
    assert list(history.columns) == HISTORY_COLUMNS


def test_optuna_trials_without_runs_still_appear(tmp_path, stores: Stores):
    storage = make_optuna_only_study(tmp_path / "optuna.journal")

    with pytest.warns(UserWarning, match="No MLflow experiment"):
        sweep = load_sweep("only-optuna", storage=storage, tracking_uri=stores.tracking_uri)

    assert len(sweep.trials) == 2
    assert sweep.trials["run_id"].isna().all()
    assert sorted(sweep.trials["batch_size"]) == [32, 64]
    assert set(sweep.trials["status"]) == {"ok"}
    assert sweep.history.empty and list(sweep.history.columns) == HISTORY_COLUMNS


def test_missing_study_and_bad_arguments(tmp_path, stores: Stores):
    with pytest.raises(LookupError, match="nope"):
        load_sweep("nope", storage=stores.storage, tracking_uri=stores.tracking_uri)
    with pytest.raises(FileNotFoundError):
        load_sweep("main", storage=tmp_path / "missing.journal", tracking_uri=stores.tracking_uri)
    assert not (tmp_path / "missing.journal").exists()
    with pytest.raises(ValueError, match="method"):
        load_sweep("main", storage=stores.storage, tracking_uri=stores.tracking_uri, method="csv")  # type: ignore[arg-type]


def test_journal_path_as_storage(stores: Stores):
    sweep = load_sweep("single", storage=str(stores.journal_path), tracking_uri=stores.tracking_uri)
    assert len(sweep.trials) == 1


def test_two_objective_study(stores: Stores):
    sweep = load_sweep("two-objectives", storage=stores.storage, tracking_uri=stores.tracking_uri)

    assert sweep.directions == ("minimize", "minimize")
    assert sweep.objective_names == ("objective", "objective_1")
    done = sweep.trials[sweep.trials["state"] == "COMPLETE"]
    assert done["objective"].notna().all() and done["objective_1"].notna().all()
