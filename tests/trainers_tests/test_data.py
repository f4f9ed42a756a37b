"""Data that streams (trainers.task.DataTask): exact accumulation, resume at the same batch, refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from batchscope.trainers.batches import batch_size_of, slice_batch
from batchscope.trainers.checkpoint import CheckpointPolicy
from batchscope.trainers.data import GlobalBatchSampler
from batchscope.trainers.loop import train
from batchscope.trainers.spec import RecordingSink, TrainSpec
from tests.trainers_tests import data_recipes

RECIPE = "tests.trainers_tests.data_recipes:build"


def spec(form: str, **kw: Any) -> TrainSpec:
    options = {"form": form, **kw.pop("options", {})}
    base: dict[str, Any] = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe=RECIPE,
        model="mlp",
        recipe_options=options,
        batch_size=32,
        lr=0.1,
        max_steps=40,
        eval_every=10,
        device="cpu",
        sharpness=False,
    )
    base.update(kw)
    return TrainSpec(**base)


def test_accumulated_gradient_equals_the_full_batch_gradient() -> None:
    """One SGD step on a Dataset in micro-batches of 5 (the last one smaller): w1 = w0 − lr·g,
    and g is the gradient of the mean loss over the whole batch of 32, computed directly."""
    task = data_recipes.build("mlp", {"form": "dataset"}, torch.device("cpu"))
    start = copy.deepcopy(task.model.state_dict())
    lr = 0.5
    result = train(
        spec("dataset", micro_batch_size=5, lr=lr, optimizer="sgd", momentum=0.0, max_steps=1, eval_every=1),
        task=task,
    )
    assert result.resolved["accum_steps"] == 7
    # The batch the loop drew: the sampler's first global batch for the run's seed.
    idx = next(iter(GlobalBatchSampler(len(task.train), 32, seed=0)))  # type: ignore[arg-type]
    x = torch.stack([task.train[i][0] for i in idx])  # type: ignore[index]
    y = torch.stack([task.train[i][1] for i in idx])  # type: ignore[index]
    reference = copy.deepcopy(task.model)
    reference.load_state_dict(start)
    F.cross_entropy(reference(x), y).backward()
    trained = dict(task.model.named_parameters())
    for name, p in reference.named_parameters():
        assert p.grad is not None
        stepped = (start[name] - trained[name].detach()) / lr
        assert torch.allclose(stepped, p.grad, atol=1e-5), name
        assert p.grad.abs().max() > 1e-4  # a real gradient, not zeros on both sides


@pytest.mark.parametrize(("form", "options"), [("dataset", {"num_workers": 1}), ("stream", {})])
def test_resume_continues_from_the_same_batch(tmp_path: Path, form: str, options: dict[str, Any]) -> None:
    """Stopped at step 25 (checkpoint at 20) and resumed: the same losses as the run never stopped.

    With a worker the loader has run ahead of the loop when the checkpoint is taken; the
    checkpoint holds the batches the loop took, not the loader's position."""
    whole = RecordingSink()
    reference = train(spec(form, options=options), whole)
    ckpt = tmp_path / "ckpt.pt"
    asked = {"n": 0}

    def stop_at_25() -> bool:
        asked["n"] += 1
        return asked["n"] * 5 >= 25  # asked at each logging point (every 5 steps here)

    stopped = train(
        spec(form, options=options, log_every=5),
        should_stop=stop_at_25,
        checkpoint=CheckpointPolicy(ckpt, every_steps=10),
    )
    assert stopped.status == "failed" and stopped.steps == 25
    resumed_sink = RecordingSink()
    resumed = train(
        spec(form, options=options), resumed_sink, checkpoint=CheckpointPolicy(ckpt, every_steps=10, resume_from=ckpt)
    )
    assert resumed.resolved["resumed_from_step"] == 20
    losses = [v for _, v in resumed_sink.history["train/loss"]]
    assert [s for s, _ in resumed_sink.history["train/loss"]] == list(range(1, 41))
    assert torch.allclose(torch.tensor(losses), torch.tensor([v for _, v in whole.history["train/loss"]]), atol=1e-6)
    assert abs(resumed.final["final/val_loss"] - reference.final["final/val_loss"]) < 1e-6


def test_a_stream_counts_tokens_and_a_recipe_metric_is_a_target() -> None:
    sink = RecordingSink()
    result = train(spec("stream", target_metric="val/acc", target_value=0.5, sharpness=True, sharpness_iters=2), sink)
    assert result.status == "ok"
    # The recipe's own metric (accuracy from `metrics`) is evaluated, logged and aimed at.
    assert [s for s, _ in sink.history["val/acc"]] == [0, 10, 20, 30, 40]
    assert 0 < result.final["final/steps_to_target"] <= 40
    # Each example counts 3 "tokens": the count to the target is 3 × the samples to it.
    assert result.final["final/tokens_to_target"] == pytest.approx(3 * result.final["final/samples_to_target"])
    assert all(v > 0 for _, v in sink.history["perf/tokens_per_s"])
    assert "final/sharpness" in result.final


def test_global_batches_split_by_rank_are_the_single_process_batch() -> None:
    """Data parallel over 4 processes: each takes its quarter of the same global batch, in the same order."""
    alone = GlobalBatchSampler(100, 48, seed=3)
    ranks = [GlobalBatchSampler(100, 48, seed=3, shard=slice(r * 12, (r + 1) * 12)) for r in range(4)]
    for _, whole, *parts in zip(range(5), alone, *ranks, strict=False):
        assert [i for part in parts for i in part] == whole
    # Resumed at batch 3, the sampler gives the 4th batch of the uninterrupted order.
    assert next(iter(GlobalBatchSampler(100, 48, seed=3, start=3))) == list(zip(range(4), alone, strict=False))[3][1]


@pytest.mark.parametrize(
    ("form", "bad", "message"),
    [
        ("collate", "per_example", "the loss must be the mean over the batch, a 0-dim tensor, got (2,)"),
        ("stream", "ragged", "inconsistent leading dimensions (features 32, label 31)"),
    ],
)
def test_a_broken_recipe_is_refused_in_one_line(form: str, bad: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        train(spec(form, options={"bad": bad}, max_steps=3))
    text = str(info.value)
    assert message in text and len(text.splitlines()) == 1


def test_batches_of_any_structure_slice_and_count() -> None:
    batch = {"ids": torch.zeros(6, 3), "mask": torch.ones(6, 3), "name": "kept"}
    assert batch_size_of(batch) == 6
    part = slice_batch(batch, 2, 5)
    assert part["ids"].shape == (3, 3) and part["name"] == "kept"
    assert batch_size_of((torch.zeros(4), torch.zeros(4, 2))) == 4
    with pytest.raises(ValueError, match="at least one tensor"):
        batch_size_of({"name": "no tensors"})


@pytest.mark.parametrize(("n", "batch_size"), [(10, 5), (10, 3), (10, 1), (10, 10), (10, 25)])
def test_device_batches_are_the_seeded_epochs_in_order(n: int, batch_size: int) -> None:
    """Each epoch is one randperm of the seeded generator; batches take the epochs' indices in order,
    across epoch ends and for batches larger than the dataset (the order a run's results depend on)."""
    from batchscope.trainers.data import DeviceBatcher

    cpu = torch.device("cpu")
    batcher = DeviceBatcher(n, batch_size, cpu, seed=7)
    drawn = torch.cat([batcher.next() for _ in range(12)])
    gen = torch.Generator().manual_seed(7)
    epochs = torch.cat([torch.randperm(n, generator=gen) for _ in range(len(drawn) // n + 1)])
    assert torch.equal(drawn, epochs[: len(drawn)])
    assert batcher.epochs_started == -(-len(drawn) // n)


@pytest.mark.parametrize(
    ("n", "batch_size", "shard"), [(10, 3, slice(None)), (10, 25, slice(None)), (12, 4, slice(2, 4))]
)
def test_tensor_batches_are_the_rows_of_the_device_batches(n: int, batch_size: int, shard: slice) -> None:
    from batchscope.trainers.data import DeviceBatcher, TensorBatches
    from batchscope.trainers.task import Task

    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)
    task = Task(model=torch.nn.Linear(1, 1), train_x=x, train_y=y, val_x=x, val_y=y, loss_fn=F.cross_entropy)
    cpu = torch.device("cpu")
    batches, reference = TensorBatches(task, batch_size, 5, shard, cpu), DeviceBatcher(n, batch_size, cpu, seed=5)
    for _ in range(12):
        bx, by = batches.next()
        idx = reference.next()[shard]
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
