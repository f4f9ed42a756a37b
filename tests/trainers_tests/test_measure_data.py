"""The offline noise scale and inference throughput on data that streams (trainers.task.DataTask).

The test blobs come in every form (tests/trainers_tests/data_recipes.py) with the same examples
and, built after the same seed, the same model: the in-memory `Task` is the reference.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from batchscope.trainers.batches import cat_batches, take_rows
from batchscope.trainers.data import EmptyEpochError
from batchscope.trainers.noise_scale_offline import (
    NoiseScaleEstimate,
    measure_data_noise_scale,
    measure_noise_scale,
)
from batchscope.trainers.recipes import build_any_task
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import DataTask, Task
from batchscope.trainers.throughput import measure_inference

BLOBS = "tests.trainers_tests.data_recipes:build"
CPU = torch.device("cpu")
SIZES = {"b_small": 32, "b_big": 256}


def blobs(form: str, n: int = 4096, **options: Any) -> Any:
    torch.manual_seed(0)  # the same initial weights in every form
    return build_any_task(BLOBS, "mlp", {"form": form, "n": n, **options}, CPU)


def reference(n_batches: int | None = 16) -> NoiseScaleEstimate:
    task = blobs("memory")
    assert isinstance(task, Task)
    return measure_noise_scale(task.model, task.loss_fn, task.train_x, task.train_y, n_batches=n_batches, **SIZES)


@pytest.mark.parametrize(("form", "workers"), [("dataset", None), ("dataset", 2), ("collate", None)])
def test_a_dataset_gives_the_estimate_of_the_same_tensors(form: str, workers: int | None) -> None:
    # Drawn with replacement by the same indices for the same seed: (x, y) pairs with the
    # default collate (loaded here or by DataLoader workers), or dicts with the recipe's
    # collate and own step, give the same numbers.
    task = blobs(form, num_workers=workers) if workers else blobs(form)
    estimate = measure_data_noise_scale(task, n_batches=16, **SIZES)
    expected = reference()
    assert estimate.b_simple == pytest.approx(expected.b_simple, rel=1e-4)
    assert estimate.grad_sq == pytest.approx(expected.grad_sq, rel=1e-4)
    assert estimate.population is None and estimate.n_batches == 16


def test_a_stream_agrees_with_the_tensors_estimate_within_its_error_bar() -> None:
    # Consecutive batches of the factory's epochs, without replacement, corrected for the
    # 4096 examples of an epoch once one has been read whole (16 batches of 256).
    estimate = measure_data_noise_scale(blobs("stream"), **SIZES)
    expected = reference(n_batches=None)
    assert estimate.population == 4096 and estimate.n_batches > 16
    assert estimate.precision_reached and math.isfinite(estimate.b_simple)
    error = math.hypot(estimate.b_simple_stderr, expected.b_simple_stderr)
    assert abs(estimate.b_simple - expected.b_simple) <= 2 * error, (estimate, expected)


def test_a_stream_not_read_to_its_end_is_taken_as_large_unless_its_size_is_given() -> None:
    assert measure_data_noise_scale(blobs("stream"), n_batches=4, **SIZES).population is None
    stated = measure_data_noise_scale(blobs("stream"), n_batches=4, num_train=4096, **SIZES)
    assert stated.population == 4096
    plain = measure_data_noise_scale(blobs("stream"), n_batches=4, **SIZES)
    # |G|² + tr(Σ)/N: the correction moves the estimate, and only by that.
    assert stated.grad_sq == pytest.approx(plain.grad_sq + plain.trace_sigma / 4096, rel=1e-6)


def test_a_stream_smaller_than_the_big_batch_is_refused() -> None:
    with pytest.raises(EmptyEpochError, match="no batch for batch_size 512"):
        measure_data_noise_scale(blobs("stream", n=256), n_batches=4, b_small=32, b_big=512)


def test_a_datatask_model_is_left_as_found() -> None:
    task = blobs("collate")
    assert isinstance(task, DataTask)
    task.model.train()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    measure_data_noise_scale(task, n_batches=2, **SIZES)
    assert task.model.training
    assert all(p.grad is None for p in task.model.parameters())
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("form", ["dataset", "collate", "stream"])
def test_throughput_times_the_recipe_forward_on_its_validation_examples(form: str) -> None:
    # 1024 examples per call from a validation set of 128: repeated past its end.
    spec = TrainSpec(recipe=BLOBS, model="mlp", recipe_options={"form": form, "n": 512}, device="cpu", precision="fp32")
    results = measure_inference(spec, [1, 1024], warmup=1, iters=5)
    assert [r.batch_size for r in results] == [1, 1024]
    for r in results:
        assert r.status == "ok" and math.isfinite(r.samples_per_s) and r.samples_per_s > 0
        assert 0 < r.latency_p50_ms <= r.latency_p95_ms


def test_throughput_leaves_a_given_datatask_model_in_training_mode() -> None:
    task = blobs("collate")
    task.model.train()
    [result] = measure_inference(task, [64], warmup=1, iters=3)
    assert result.status == "ok" and task.model.training


def test_rows_of_dict_and_tuple_batches() -> None:
    # Every tensor is indexed along its examples; other leaves (a string) travel whole.
    a = {"x": torch.arange(6).reshape(3, 2), "label": torch.tensor([0, 1, 2]), "name": "blobs"}
    b = {"x": torch.arange(6, 10).reshape(2, 2), "label": torch.tensor([3, 4]), "name": "blobs"}
    joined = cat_batches([a, b])
    assert joined["label"].tolist() == [0, 1, 2, 3, 4] and joined["name"] == "blobs"
    picked = take_rows(joined, torch.tensor([4, 0, 4]))
    assert picked["x"].tolist() == [[8, 9], [0, 1], [8, 9]] and picked["label"].tolist() == [4, 0, 4]
    pair = take_rows(
        cat_batches([(torch.zeros(2, 3), torch.ones(2)), (torch.zeros(1, 3), torch.ones(1))]), torch.arange(3)
    )
    assert isinstance(pair, tuple) and pair[0].shape == (3, 3) and pair[1].shape == (3,)
