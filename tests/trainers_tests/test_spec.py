"""The sink contract (trainers/spec.py): a Sink subclass overrides what it keeps, the rest has defaults."""

from __future__ import annotations

from collections.abc import Mapping

from batchscope.trainers.loop import train
from batchscope.trainers.spec import Sink
from tests.trainers_tests.test_loop import spec


class OnlyMetrics(Sink):
    """Overrides `metrics` alone: no `series`, `params`, `evaluated` or `flush` of its own."""

    def __init__(self) -> None:
        self.loss_steps: list[int] = []

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if "train/loss" in values:
            self.loss_steps.append(step)


def test_a_sink_without_series_gets_every_per_step_loss_through_metrics() -> None:
    sink = OnlyMetrics()
    result = train(spec(max_steps=25, eval_every=10, log_every=7, gns=False, sharpness=False), sink)
    assert result.status == "ok"
    assert sink.loss_steps == list(range(1, 26))  # each step once, in order, across logging windows


def test_the_bare_sink_trains_to_the_end() -> None:
    # Every method has a default: nothing is looked up with getattr, nothing stops the run.
    result = train(spec(max_steps=20, eval_every=10, gns=False, sharpness=False), Sink())
    assert result.status == "ok" and result.steps == 20
