"""Fixtures shared by the sweeps tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.fixture
def mlflow_store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    """A fresh SQLite MLflow store: its client, tracking URI and one experiment's id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("metrics", artifact_location=(tmp_path / "a").as_uri())
    return client, uri, exp
