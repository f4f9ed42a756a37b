"""When a run reached its target, between two evaluations (trainers/evaluation.py)."""

from __future__ import annotations

import pytest

from batchscope.trainers.evaluation import crossing


@pytest.mark.parametrize(
    ("before", "after", "target", "expected"),
    [
        ((50, 0.40, 1.0), (100, 0.60, 2.0), 0.50, (75.0, 1.5)),  # half-way in value: half-way in steps and time
        ((50, 0.40, 1.0), (100, 0.60, 2.0), 0.60, (100.0, 2.0)),  # reached exactly at the evaluation
        ((50, 2.0, 1.0), (100, 1.0, 3.0), 1.5, (75.0, 2.0)),  # a loss target, reached from above
        (None, (100, 0.60, 2.0), 0.50, (100.0, 2.0)),  # nothing to interpolate from
        ((50, 0.40, 1.0), (100, 0.40, 2.0), 0.40, (100.0, 2.0)),  # flat: the evaluation itself
    ],
)
def test_crossing_interpolates_between_the_evaluations_around_it(
    before: tuple[float, float, float] | None, after: tuple[float, float, float], target: float, expected: tuple
) -> None:
    assert crossing(before, after, target) == pytest.approx(expected)
