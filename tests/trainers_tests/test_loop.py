"""The training loop alone: real training on MNIST-1D, no optuna, no mlflow."""

from __future__ import annotations

import math

import pytest
import torch

from batchscope.trainers.loop import train
from batchscope.trainers.plan import micro_batches
from batchscope.trainers.spec import RecordingSink, TrainSpec

OPTS = {"num_samples": 1200}


def spec(**kw: object) -> TrainSpec:
    base: dict = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe_options=OPTS,
        batch_size=64,
        lr=0.1,
        max_steps=150,
        eval_every=50,
        device="cpu",
        sharpness_iters=5,
    )
    base.update(kw)
    return TrainSpec(**base)


def test_loss_falls_and_accuracy_beats_chance() -> None:
    sink = RecordingSink()
    result = train(spec(), sink)
    losses = [v for _, v in sink.history["train/loss"]]
    assert result.status == "ok"
    assert len(losses) == 150  # one value per step
    # The mean of the last 20 steps is well below the first step (ln 10 ≈ 2.30 at chance).
    assert sum(losses[-20:]) / 20 < losses[0] - 0.3
    assert result.final["final/val_acc"] > 0.2  # 10 classes: chance is 0.1


def test_by_default_each_logging_window_is_one_row_of_mean_min_and_max() -> None:
    """The default (`log_every_step` off): one train/loss row per window, at its last step, from
    the same per-step losses the every-step option logs (same seed, same run)."""
    kw = dict(max_steps=25, eval_every=10, log_every=7, gns_every=5, sharpness=False)
    windows, steps = RecordingSink(), RecordingSink()
    train(spec(log_every_step=False, **kw), windows)
    train(spec(**kw), steps)
    every = dict(steps.history["train/loss"])
    assert len(every) == 25
    # Windows end every 7 steps or at an evaluation (10, 20) or the end (25).
    ends = [7, 10, 17, 20, 25]
    assert [s for s, _ in windows.history["train/loss"]] == ends
    for (lo, hi), (_, mean), (_, low), (_, high) in zip(
        zip([0, *ends[:-1]], ends, strict=True),
        windows.history["train/loss"],
        windows.history["train/loss_min"],
        windows.history["train/loss_max"],
        strict=True,
    ):
        window = [every[s] for s in range(lo + 1, hi + 1)]
        assert mean == pytest.approx(sum(window) / len(window), rel=1e-12)
        assert (low, high) == (min(window), max(window))
    assert "train/loss_min" not in steps.history  # the every-step option logs the losses alone
    # A constant lr: logged at the first logging point, then only at evaluations and the end.
    assert [s for s, _ in windows.history["lr"]] == [7, 10, 20, 25]


def test_same_seed_gives_identical_metrics_on_cpu() -> None:
    a, b = RecordingSink(), RecordingSink()
    # A fixed noise-scale cadence: a chosen one comes from timings (see test_noise_scale_cadence).
    ra, rb = train(spec(seed=3, gns_every=10), a), train(spec(seed=3, gns_every=10), b)
    assert a.history["train/loss"] == b.history["train/loss"]
    for key in ("final/val_loss", "final/train_loss", "final/val_acc", "final/sharpness"):
        assert ra.final[key] == rb.final[key]


def test_different_seeds_differ() -> None:
    a, b = RecordingSink(), RecordingSink()
    train(spec(seed=0, max_steps=20), a)
    train(spec(seed=1, max_steps=20), b)
    assert a.history["train/loss"] != b.history["train/loss"]


def test_contract_metrics_are_reported_at_each_eval() -> None:
    sink = RecordingSink()
    result = train(spec(target_metric="val/acc", target_value=0.15), sink)
    for key in ("val/loss", "val/acc", "perf/samples_per_s", "mem/peak_mb", "gns/grad_sq", "gns/trace_sigma", "lr"):
        assert key in sink.history, key
    assert [s for s, _ in sink.history["val/loss"]] == [0, 50, 100, 150]  # 0: at initialization, for the target
    for key in (
        "final/train_loss",
        "final/train_acc",
        "final/val_loss",
        "final/val_acc",
        "final/gen_gap",
        "final/sharpness",
        "final/steps_to_target",
        "final/samples_to_target",
        "final/time_to_target_s",
        "final/wall_s",
    ):
        assert key in result.final, key
    assert result.final["final/samples_to_target"] == result.final["final/steps_to_target"] * 64
    assert math.isclose(
        result.final["final/gen_gap"], result.final["final/val_loss"] - result.final["final/train_loss"]
    )


def test_unreached_target_leaves_no_steps_to_target_and_says_why() -> None:
    result = train(spec(max_steps=20, eval_every=10, target_metric="val/acc", target_value=0.99))
    assert "final/steps_to_target" not in result.final
    assert "not reached" in result.reason


def test_huge_learning_rate_diverges_instead_of_crashing() -> None:
    result = train(spec(lr=1e6, optimizer="sgd", max_steps=100))
    assert result.status == "diverged"
    assert "step" in result.reason


def test_stop_at_target_ends_early() -> None:
    result = train(spec(max_steps=400, eval_every=10, target_metric="val/acc", target_value=0.15, stop_at_target=True))
    assert result.status == "ok"
    # It stops at the evaluation past the target; the crossing is interpolated before it.
    assert result.steps == result.final["final/steps_to_target_high"] < 400
    assert result.final["final/steps_to_target_low"] <= result.final["final/steps_to_target"] <= result.steps


def test_sink_can_stop_the_run() -> None:
    class StopAtSecondEval(RecordingSink):
        def evaluated(self, step: int, values: object) -> bool:  # type: ignore[override]
            return step < 100

    result = train(spec(), StopAtSecondEval())
    assert result.status == "pruned"
    assert result.steps == 100


@pytest.mark.parametrize(("batch", "micro", "expected"), [(10, 10, [(0, 10)]), (10, 4, [(0, 4), (4, 8), (8, 10)])])
def test_micro_batches_cover_the_batch(batch: int, micro: int, expected: list[tuple[int, int]]) -> None:
    assert micro_batches(batch, micro) == expected


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"max_steps": 0}, "max_steps"),
        ({"micro_batch_size": 100}, "micro_batch_size"),
    ],
)
def test_bad_spec_is_refused_with_the_field(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**kw)


def test_batch_larger_than_dataset_spans_epochs() -> None:
    result = train(spec(batch_size=2048, max_steps=3, eval_every=3))
    assert result.status == "ok"


def test_device_is_cpu_without_cuda() -> None:
    result = train(spec(device="auto", max_steps=2, eval_every=2))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert result.resolved["device"].startswith(expected)


class FlushRecordingSink(RecordingSink):
    """Notes, at each flush, how many per-step losses it had: the loop hands them over when training ends."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed_at: list[int] = []

    def flush(self) -> None:
        self.flushed_at.append(len(self.history.get("train/loss", [])))


@pytest.mark.parametrize(("max_steps", "stop"), [(25, None), (150, 100)])
def test_final_validation_is_the_last_evaluation_not_a_second_one(
    monkeypatch: pytest.MonkeyPatch, max_steps: int, stop: int | None
) -> None:
    """The run ends on an evaluation (its last step, or a pruning stop): the final val_* are that one's values."""
    import batchscope.trainers.evaluation as evaluation

    calls: list[int] = []
    real = evaluation.evaluate_batches

    def counting(task, batches, autocast):  # type: ignore[no-untyped-def]
        result, n = real(task, batches, autocast)
        calls.append(n)
        return result, n

    monkeypatch.setattr(evaluation, "evaluate_batches", counting)

    class Pruning(FlushRecordingSink):
        def evaluated(self, step: int, values) -> bool:  # type: ignore[no-untyped-def]
            super().evaluated(step, values)
            return stop is None or step < stop

    sink = Pruning()
    result = train(spec(max_steps=max_steps, eval_every=10, sharpness=False), sink)
    last = stop or max_steps
    val_steps = [s for s, _ in sink.history["val/loss"]]
    assert val_steps[-1] == last
    assert result.final["final/val_loss"] == sink.history["val/loss"][-1][1]
    assert result.final["final/val_acc"] == sink.history["val/acc"][-1][1]
    # One evaluation per evaluation point, plus the training subset at the end: nothing twice.
    assert len(calls) == len(val_steps) + 1
    # Everything the run measured per step was handed over once, before the end-of-run measurements.
    assert sink.flushed_at == [last]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_optimizer_is_fused_on_cpu_and_steps_like_torchs_default(optimizer: str) -> None:
    """Fused kernels make a small model's step 2-3.5x faster on the CPU; the updates must not change."""
    from batchscope.trainers.loop import make_optimizer

    s = spec(optimizer=optimizer, weight_decay=0.01)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(s, a, 0.05)
    assert fused.defaults["fused"] is True
    kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    extra = {"momentum": s.momentum} if optimizer == "sgd" else {}
    plain = kind(b.parameters(), lr=0.05, weight_decay=0.01, **extra)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_steps_to_target_do_not_depend_on_the_evaluation_cadence() -> None:
    # The same run (same seed, no noise-scale steps) evaluated every 5 and every 50 steps: the
    # interpolated crossings agree within 10% (seen: 79.3 and 81.6), while the first evaluation
    # past the target (the old reading) is at 80 and 100. The evaluations bracket the crossing.
    results = {}
    for every in (5, 50):
        s = spec(
            recipe_options={"num_samples": 4000}, batch_size=256, lr=0.3, max_steps=300, eval_every=every,
            gns=False, sharpness=False, target_metric="val/acc", target_value=0.5, stop_at_target=True,
        )  # fmt: skip
        results[every] = train(s, RecordingSink()).final
    fine, coarse = results[5], results[50]
    assert coarse["final/steps_to_target"] == pytest.approx(fine["final/steps_to_target"], rel=0.10)
    for final in (fine, coarse):
        low, high = final["final/steps_to_target_low"], final["final/steps_to_target_high"]
        assert low <= final["final/steps_to_target"] <= high
        assert final["final/samples_to_target"] == pytest.approx(256 * final["final/steps_to_target"])
        assert 0 < final["final/time_to_target_s"] <= final["final/train_time_s"]
    assert coarse["final/steps_to_target_high"] - coarse["final/steps_to_target"] > 10


@pytest.mark.parametrize(("factor", "reason"), [(100.0, "over 100× the initial"), (None, "nan")])
def test_a_loss_that_explodes_is_a_divergence(factor: float | None, reason: str) -> None:
    # SGD far above the stable learning rate: the loss grows geometrically. With the default
    # factor it stops while still finite (a loss of 1e18 is not a result); without, at NaN/inf.
    result = train(spec(lr=50.0, momentum=0.0, max_steps=400, divergence_factor=factor), RecordingSink())
    assert result.status == "diverged"
    assert reason in result.reason or (factor is None and "inf" in result.reason)


@pytest.mark.parametrize(("schedule", "warmup"), [("constant", 0), ("constant", 5), ("cosine", 0), ("linear", 5)])
def test_the_lr_follows_the_schedule_and_the_optimizer_steps_unwrapped(schedule: str, warmup: int) -> None:
    """torch's scheduler wraps optimizer.step to warn when it steps first; the loop drops the wrapper
    once nothing reads it (never stepped, or after its first step): no warning, the same lr."""
    import warnings

    from batchscope.trainers.loop import _Run
    from batchscope.trainers.plan import plan_run
    from batchscope.trainers.schedule import lr_multiplier
    from batchscope.trainers.spec import NullSink

    s = spec(schedule=schedule, warmup_steps=warmup, max_steps=20, eval_every=20, gns=False)
    run = _Run(s, plan_run(s), NullSink(), None, None)
    factor = lr_multiplier(schedule, warmup, s.max_steps)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, s.max_steps + 1):
            run.train_step(step)
            lrs.append(run.optimizer.param_groups[0]["lr"])
            assert "step" not in vars(run.optimizer)  # the class's own step, without the wrapper
    assert lrs == [run.plan.lr * factor(k) for k in range(1, s.max_steps + 1)]
