"""Checkpoints: a run stopped part-way and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import torch

from batchscope.trainers.checkpoint import CheckpointPolicy
from batchscope.trainers.loop import train
from batchscope.trainers.spec import RecordingSink, TrainSpec


def spec(**kw: object) -> TrainSpec:
    base: dict = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe_options={"num_samples": 1200},
        batch_size=32,
        lr=0.05,
        max_steps=80,
        eval_every=20,
        device="cpu",
        sharpness=False,
    )
    base.update(kw)
    return TrainSpec(**base)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = RecordingSink()
    reference = train(spec(), whole)

    ckpt = tmp_path / "ckpt.pt"
    calls = {"n": 0}

    def stop_after_step_50() -> bool:
        calls["n"] += 1
        return calls["n"] * 10 >= 50  # should_stop is asked at each logging point (every 10 steps)

    first = RecordingSink()
    stopped = train(spec(), first, should_stop=stop_after_step_50, checkpoint=CheckpointPolicy(ckpt, every_steps=20))
    assert stopped.status == "failed" and stopped.steps == 50
    assert ckpt.exists()  # saved at step 40, the last evaluation point before the stop

    resumed_sink = RecordingSink()
    resumed = train(spec(), resumed_sink, checkpoint=CheckpointPolicy(ckpt, every_steps=20, resume_from=ckpt))
    assert resumed.resolved["resumed_from_step"] == 40
    # The history is complete and has no duplicate steps.
    steps = [s for s, _ in resumed_sink.history["train/loss"]]
    assert steps == list(range(1, 81))
    # Same losses and same final metrics as the run that was never interrupted.
    assert torch.allclose(
        torch.tensor([v for _, v in resumed_sink.history["train/loss"]]),
        torch.tensor([v for _, v in whole.history["train/loss"]]),
        atol=1e-6,
    )
    assert abs(resumed.final["final/val_loss"] - reference.final["final/val_loss"]) < 1e-6


def test_checkpoint_is_loaded_with_weights_only(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    train(spec(max_steps=20), checkpoint=CheckpointPolicy(ckpt, every_steps=20))
    payload = torch.load(ckpt, weights_only=True)  # raises if anything but tensors and plain data
    assert payload["state"]["step"] == 20


def test_bad_policy_is_refused(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="every_steps"):
        CheckpointPolicy(tmp_path / "x", every_steps=0)
