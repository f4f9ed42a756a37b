"""The noise-scale cadence: fixed, or chosen from timed steps to stay within a cost budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscope.trainers.checkpoint import CheckpointPolicy
from batchscope.trainers.loop import train
from batchscope.trainers.noise_scale_in_loop import Cadence
from batchscope.trainers.spec import RecordingSink, TrainSpec


def test_fixed_cadence_measures_every_nth_step() -> None:
    c = Cadence(5, 0.02, first_step=1)
    assert c.chosen
    assert [s for s in range(1, 21) if c.measures(s)] == [5, 10, 15, 20]
    assert not any(c.probing(s) for s in range(1, 21))


def test_probe_schedule_then_choice_from_the_fastest_times() -> None:
    c = Cadence(None, 0.02, first_step=1, warmup=4, probes=4)
    probed = [s for s in range(1, 40) if c.probing(s)]
    assert probed == list(range(5, 17))  # after 4 warm-up steps, 3 × 4 probe steps
    assert [s for s in probed if c.measures(s)] == [5, 8, 11, 14]
    assert [s for s in range(1, 40) if c.due(s)] == [16]
    for s in probed:
        # A measuring step costs a second step; one plain and one measuring step were slowed down by other work.
        seconds = 2.0 if c.measures(s) else 1.0
        c.record(c.measures(s), seconds * (5 if s in (6, 8) else 1))
    # extra 1.0 / (0.02 × 1.0) = 50, rounded up to 64: measuring costs at most 2% of the training time.
    assert c.choose() == 64
    assert c.measures(128) and not c.measures(100) and not c.probing(20)


@pytest.mark.parametrize(
    ("plain", "measuring", "every"),
    [(1.0, 1.0, 1), (1.0, 0.9, 1), (1.0, 1.02, 1), (1.0, 1.03, 2), (1.0, 1.64, 32), (1.0, 9.0, 128)],
)
def test_choice_is_bounded(plain: float, measuring: float, every: int) -> None:
    c = Cadence(None, 0.02, first_step=1)
    c.record(False, plain)
    c.record(True, measuring)
    assert c.choose() == every


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="every=0"):
        Cadence(0, 0.02, 1)
    with pytest.raises(ValueError, match="budget=0"):
        Cadence(None, 0.0, 1)
    with pytest.raises(ValueError, match="gns_budget"):
        TrainSpec(gns_budget=1.5)


def spec(**kw: object) -> TrainSpec:
    base: dict = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe_options={"num_samples": 1200},
        batch_size=32,
        lr=0.05,
        max_steps=120,
        eval_every=40,
        device="cpu",
    )
    base.update(sharpness=False, **kw)
    return TrainSpec(**base)


def test_the_loop_chooses_a_cadence_reports_it_and_measures_on_it() -> None:
    sink = RecordingSink()
    result = train(spec(), sink)
    every = result.resolved["gns_every"]
    assert isinstance(every, int) and 1 <= every <= 128 and every & (every - 1) == 0
    assert "gns/b_simple" in sink.history or "gns/trace_sigma" in sink.history


def test_an_explicit_cadence_is_kept() -> None:
    result = train(spec(gns_every=7), RecordingSink())
    assert result.resolved["gns_every"] == 7


def test_a_resumed_run_keeps_the_cadence_it_chose(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    calls = {"n": 0}

    def stop_at_step_60() -> bool:
        calls["n"] += 1
        return calls["n"] * 10 >= 60

    first = train(spec(), RecordingSink(), should_stop=stop_at_step_60, checkpoint=CheckpointPolicy(ckpt, 40))
    assert first.status == "failed"
    resumed = train(spec(), RecordingSink(), checkpoint=CheckpointPolicy(ckpt, 40, resume_from=ckpt))
    assert resumed.resolved["resumed_from_step"] == 40
    assert resumed.resolved["gns_every"] == first.resolved["gns_every"]


def test_reruns_with_a_chosen_cadence_agree_to_rounding() -> None:
    # The chosen cadence may differ between reruns (it comes from timings); the trajectory may then
    # differ in the last digits only: a measuring step's update is the same mean gradient, summed in halves.
    a, b = RecordingSink(), RecordingSink()
    train(spec(seed=3, gns_every=None), a)
    train(spec(seed=3, gns_every=5), b)
    la, lb = [v for _, v in a.history["train/loss"]], [v for _, v in b.history["train/loss"]]
    assert len(la) == len(lb) == 120
    assert max(abs(x - y) / abs(y) for x, y in zip(la, lb, strict=True)) < 1e-4
