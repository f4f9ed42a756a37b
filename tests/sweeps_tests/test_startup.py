"""Start-up of `batchscope sweep`: MLflow stores copied from a cached empty one; no torch in the sweep process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchscope.sweeps import store_setup as stores
from batchscope.sweeps.store_setup import Stores, check_tracking, empty_store_path
from tests.conftest import small_config, write_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty batchscope cache of this test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BATCHSCOPE_CACHE", str(folder))
    return folder


def _make_store(root: Path) -> str:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    check_tracking(Stores(str(root / "optuna.journal"), uri, (root / "artifacts").as_uri(), root))
    return uri


def _no_migrations(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.store.db.utils

    def refuse(engine: object) -> None:
        raise AssertionError("MLflow's migrations ran, the store was not copied")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", refuse)


def test_a_store_copied_from_the_cache_is_a_working_mlflow_store(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    _make_store(tmp_path / "first")  # migrates once, into the cache
    assert empty_store_path().is_file() and empty_store_path().parent == cache
    _no_migrations(monkeypatch)
    uri = _make_store(tmp_path / "second")

    client = MlflowClient(uri)
    # The default experiment as MLflow makes it on any new database: id 0, made when opened.
    default = client.get_experiment("0")
    assert default.name == "Default" and default.lifecycle_stage == "active"
    by_name = client.get_experiment_by_name("Default")
    assert by_name is not None and by_name.experiment_id == "0"
    # New experiments get fresh ids, as on a database MLflow migrated itself.
    first = client.create_experiment("a")
    second = client.create_experiment("b")
    assert (first, second) == ("1", "2")
    run = client.create_run(first, tags={"k": "v"})
    client.log_metric(run.info.run_id, "m", 0.5, step=3)
    client.log_param(run.info.run_id, "p", "x")
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.metrics == {"m": 0.5} and got.data.params == {"p": "x"} and got.info.status == "FINISHED"
    # MLflow's own store class opens it too, and agrees on the schema.
    store = SqlAlchemyStore(uri, (tmp_path / "art").as_uri())
    assert store.get_experiment("0").name == "Default"
    assert [e.name for e in store.search_experiments()] == ["b", "a", "Default"]


def test_a_copied_store_holds_the_same_as_one_mlflow_made(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    copied = _make_store(tmp_path / "copied").removeprefix("sqlite:///")
    monkeypatch.setattr(stores, "_copy_empty_store", lambda db: False)
    migrated = _make_store(tmp_path / "migrated").removeprefix("sqlite:///")

    def contents(path: str) -> tuple[set[frozenset[str]], list[tuple[object, ...]], list[tuple[object, ...]]]:
        conn = sqlite3.connect(path)
        try:
            # Each table's columns and constraints, in any order: MLflow's migrations write the
            # constraints of a table they rebuild in an order that varies from one run to the next.
            schema = {
                frozenset(line.strip().rstrip(",").strip() for line in row[0].splitlines())
                for row in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
            }
            experiments = conn.execute("SELECT experiment_id, name, lifecycle_stage, workspace FROM experiments")
            version = conn.execute("SELECT version_num FROM alembic_version")
            return schema, experiments.fetchall(), version.fetchall()
        finally:
            conn.close()

    assert contents(copied) == contents(migrated)


def test_a_corrupt_cached_store_falls_back_to_migrating(tmp_path: Path, cache: Path) -> None:
    from mlflow import MlflowClient

    cache.mkdir()
    empty_store_path().write_bytes(b"not a database" * 100)
    uri = _make_store(tmp_path / "store")
    assert MlflowClient(uri).get_experiment("0").name == "Default"
    assert not empty_store_path().exists()  # made afresh next time
    _make_store(tmp_path / "next")
    assert empty_store_path().is_file()


def test_a_cached_store_mlflow_refuses_falls_back(tmp_path: Path, cache: Path) -> None:
    import sqlite3

    from mlflow import MlflowClient

    _make_store(tmp_path / "first")
    conn = sqlite3.connect(empty_store_path())
    conn.execute("UPDATE alembic_version SET version_num = 'not-a-revision'")  # looks whole, is not MLflow's
    conn.commit()
    conn.close()
    uri = _make_store(tmp_path / "second")
    client = MlflowClient(uri)
    assert client.get_experiment("0").name == "Default"
    run = client.create_run(client.create_experiment("a"))
    client.set_terminated(run.info.run_id)
    assert not empty_store_path().exists()


def test_an_unusable_cache_falls_back_to_migrating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file")
    monkeypatch.setenv("BATCHSCOPE_CACHE", str(blocker / "cache"))
    uri = _make_store(tmp_path / "store")
    assert MlflowClient(uri).get_experiment("0").name == "Default"


def test_processes_starting_together_share_one_cached_store(tmp_path: Path, cache: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from mlflow import MlflowClient
        from batchscope.sweeps.store_setup import Stores, check_tracking, quiet_libraries

        quiet_libraries()
        root = Path(sys.argv[1])
        uri = f"sqlite:///{root / 'mlflow.db'}"
        check_tracking(Stores("", uri, None, root))
        client = MlflowClient(uri)
        client.create_run(client.create_experiment("x"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"store-{i}")], env=env, stderr=subprocess.PIPE)
        for i in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    assert [p.name for p in cache.glob("*.db")] == [empty_store_path().name]
    assert not list(cache.glob("*.tmp")) and not list(tmp_path.glob("store-*/*.tmp"))


def _assert_runs_without_torch(workdir: Path, body: str) -> None:
    """Run `body` in a fresh interpreter (the sweep process) and check that it never imported torch."""
    from batchscope.sweeps.devices import torch_has_gpu_support

    if torch_has_gpu_support():
        pytest.skip("with a CUDA or ROCm build of PyTorch the sweep process asks torch for the device")
    code = textwrap.dedent(body) + textwrap.dedent(
        """
        import sys
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_sweep_process_does_not_import_torch(workdir: Path) -> None:
    config = write_config(workdir / "sweep.yaml", small_config("no-torch"))
    _assert_runs_without_torch(
        workdir,
        f"""
        import batchscope.sweeps.cli, batchscope.sweeps.commands, batchscope.sweeps.progress
        from batchscope.sweeps.commands import load_config
        from batchscope.sweeps.runner import Sweep
        from batchscope.sweeps.specs import planned_device, run_params

        cfg = load_config({str(config)!r})
        sweep = Sweep(cfg)
        trial = sweep.study.ask()
        spec = sweep.spec_for({{"batch_size": 16, "lr": 0.1}}, seed=0)
        assert run_params(spec, cfg)["batch_size"] == 16
        assert planned_device(spec.device, spec.precision) == ("cpu", "fp32")
        assert sweep.checkpoints.policy(trial, 0) is not None
        """,
    )


def test_keeping_the_best_weights_does_not_import_torch_in_the_sweep_process(workdir: Path) -> None:
    """The worker writes a kept trial's `weights/model.pt`: importing torch would stall the sweep for seconds."""
    cfg = small_config("weights-no-torch", search__n_trials=2)
    cfg["train"].update({"max_steps": 20, "eval_every": 10, "checkpoint": {"every_steps": 10, "keep": "best"}})
    config = write_config(workdir / "sweep.yaml", cfg)
    _assert_runs_without_torch(
        workdir,
        f"""
        from batchscope.sweeps.cli import main

        assert main(["sweep", {str(config)!r}, "--no-report"]) == 0
        """,
    )
    import optuna
    import torch
    from mlflow import MlflowClient

    from batchscope.sweeps.store_setup import journal_storage

    study = optuna.load_study(
        study_name="weights-no-torch", storage=journal_storage(workdir / "mlruns" / "optuna.journal")
    )
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    path = client.download_artifacts(study.best_trial.user_attrs["mlflow_run_id"], "weights/model.pt")
    state = torch.load(path, weights_only=True)
    assert any(k.endswith("weight") for k in state)


@pytest.mark.parametrize("budget", [{"max_samples": 2048}, {"max_epochs": 2}])
@pytest.mark.parametrize("recipe", ["mnist1d", "digits", "cifar10", "charlm"])
def test_every_recipe_s_sample_and_epoch_budgets_need_no_torch_in_the_sweep_process(
    workdir: Path, recipe: str, budget: dict
) -> None:
    """The training-set size that turns the budget into steps is read once, without torch."""
    from tests.trainers_tests.cifar_fixtures import write_fake_cifar10

    trainer: dict = {
        "mnist1d": {"recipe": "mnist1d", "model": "mlp", "num_samples": 1200},
        "digits": {"recipe": "digits", "model": "cnn"},
        "cifar10": {"recipe": "cifar10", "model": "resnet9", "data_dir": str(workdir / "cifar"), "train_batches": 1},
        "charlm": {"recipe": "charlm", "model": "transformer", "text_file": str(workdir / "text.txt"), "seq_len": 16},
    }[recipe]
    if recipe == "cifar10":
        write_fake_cifar10(workdir / "cifar", n_per_batch=32, seed=0)
    if recipe == "charlm":
        (workdir / "text.txt").write_text("to be or not to be, that is the question. " * 60, encoding="utf-8")
    cfg = small_config(f"no-torch-{recipe}", trainer=trainer)
    cfg["train"].pop("max_steps")
    cfg["train"].update(budget)
    cfg["train"].pop("target")
    config = write_config(workdir / "sweep.yaml", cfg)
    _assert_runs_without_torch(
        workdir,
        f"""
        from batchscope.sweeps.commands import load_config
        from batchscope.sweeps.runner import Sweep

        cfg = load_config({str(config)!r})
        sweep = Sweep(cfg)
        assert sweep.num_train is not None and sweep.num_train > 0, sweep.num_train
        for batch in (16, 64):
            spec = sweep.spec_for({{"batch_size": batch, "lr": 0.1}}, seed=0)
            assert spec.max_steps == cfg.train.steps_for(batch, sweep.num_train), spec.max_steps
        """,
    )
