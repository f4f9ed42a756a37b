"""The report says where BatchNorm saw micro-batches instead of the whole batch."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from batchscope.analysis.findings import _batchnorm


def _sweep(rows: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(trials=pd.DataFrame(rows))


def test_micro_batches_under_batchnorm_are_named() -> None:
    sweep = _sweep(
        [
            {"batch_size": 256, "micro_batch_size": "64", "batchnorm": "True", "gns": "False"},
            {"batch_size": 32, "micro_batch_size": "32", "batchnorm": "True", "gns": "False"},
        ]
    )
    note = _batchnorm(sweep)  # type: ignore[arg-type]
    assert note is not None
    assert "micro-batches of 64" in note and "1 run(s)" in note and "256" in note


def test_no_note_without_batchnorm() -> None:
    sweep = _sweep([{"batch_size": 256, "micro_batch_size": "64", "batchnorm": "False", "gns": "True"}])
    assert _batchnorm(sweep) is None  # type: ignore[arg-type]


def test_noise_scale_halves_are_mentioned() -> None:
    sweep = _sweep([{"batch_size": 64, "micro_batch_size": "64", "batchnorm": "True", "gns": "True"}])
    note = _batchnorm(sweep)  # type: ignore[arg-type]
    assert note is not None and "half batches" in note
