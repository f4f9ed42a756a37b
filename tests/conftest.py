"""Shared fixtures: every test gets its own store folder; the MNIST-1D cache is shared."""

from __future__ import annotations

import os

# Tiny models on a busy 2-core machine: one thread per process avoids OpenMP spin contention
# (10-30x slowdowns seen); set before torch is imported, and inherited by worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# A small, fast MNIST-1D for tests (the demo uses 5000 samples).
SMALL_TRAINER = {"recipe": "mnist1d", "model": "mlp", "num_samples": 1200}


@pytest.fixture(scope="session", autouse=True)
def _shared_data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["BATCHSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory whose default stores land in ./mlruns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(tmp_path / "mlruns"))
    return tmp_path


def small_config(study: str = "t", **overrides: object) -> dict:
    """A sweep config dict that trains in about a second per trial."""
    cfg: dict = {
        "study": study,
        "trainer": dict(SMALL_TRAINER),
        "train": {
            "max_steps": 60,
            "eval_every": 20,
            "target": {"metric": "val/acc", "value": 0.3},
            "sharpness": {"iters": 5},
        },
        "search": {
            "batch_size": {"values": [16, 64, 256]},
            "lr": {"low": 0.01, "high": 0.5, "log": True},
            "n_trials": 3,
            "sampler": "random",
        },
        "device": "cpu",
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_sweeps(base: Path, configs: list[dict]) -> Path:
    """Run each config as `batchscope sweep` with its stores in `base/mlruns` (for module-scoped
    fixtures, which cannot use `workdir`); each config is written to `base/<study>.yaml`."""
    from batchscope.sweeps.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("BATCHSCOPE_ROOT", str(base / "mlruns"))
        for cfg in configs:
            assert main(["sweep", str(write_config(base / f"{cfg['study']}.yaml", cfg)), "--no-report"]) == 0
    return base


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server (trust auth), dropped afterwards. Yields its name."""
    psycopg = pytest.importorskip("psycopg")
    name = f"bs_test_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg.connect(PG_ADMIN, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not running on 127.0.0.1:5432: {exc}")
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()
