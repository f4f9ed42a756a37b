"""Hand-written MLflow loops, the yardsticks the issue quotes: the bare loop plus logging.

- `log_metric`: `mlflow.log_metric("train/loss", loss.item(), step=step)` on every step, the
  way MLflow's quickstart writes it (one synchronous database write per step);
- `log_batch`: the loss read every step, buffered, and written with one `log_batch` call
  every 50 steps.

Both write to a real MLflow run in the same SQLite store as batchscope's sink.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from benchmarks.bare import OnStep

BATCH_EVERY = 50


@contextmanager
def log_metric_every_step(tracking_uri: str, experiment_id: str) -> Iterator[OnStep]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id):

        def on_step(step: int, loss: torch.Tensor) -> None:
            mlflow.log_metric("train/loss", loss.item(), step=step)

        yield on_step


@contextmanager
def log_batch_every(tracking_uri: str, experiment_id: str, every: int = BATCH_EVERY) -> Iterator[OnStep]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(experiment_id).info.run_id
    buffer: list[Metric] = []

    def on_step(step: int, loss: torch.Tensor) -> None:
        buffer.append(Metric("train/loss", loss.item(), int(time.time() * 1000), step))
        if len(buffer) >= every:
            client.log_batch(run_id, metrics=buffer)
            buffer.clear()

    try:
        yield on_step
        if buffer:
            client.log_batch(run_id, metrics=buffer)
    finally:
        client.set_terminated(run_id)
