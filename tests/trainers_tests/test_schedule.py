"""Learning-rate scaling with batch size, warmup and decay (trainers/schedule.py)."""

from __future__ import annotations

import pytest

from batchscope.trainers.schedule import lr_multiplier, scaled_lr


@pytest.mark.parametrize(
    ("rule", "batch", "expected"),
    [("none", 512, 0.1), ("linear", 512, 0.4), ("linear", 64, 0.05), ("sqrt", 512, 0.2), ("sqrt", 32, 0.05)],
)
def test_lr_scaling_rules(rule: str, batch: int, expected: float) -> None:
    # lr 0.1 is written for the reference batch 128.
    assert scaled_lr(0.1, batch, rule, 128) == pytest.approx(expected)


def test_warmup_then_constant() -> None:
    f = lr_multiplier("constant", warmup_steps=4, max_steps=100)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_multiplier("cosine", warmup_steps=0, max_steps=100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
