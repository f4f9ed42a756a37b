"""The frontier as it stands: lr brackets per batch size and B_crit against compute, on made-up tables."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pandas as pd
import pytest

from batchscope.analysis import frontier, tables
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.findings import bracket_sentence
from batchscope.analysis.fits import fit_critical_batch
from batchscope.analysis.load import load_sweep
from batchscope.analysis.report import render_report
from tests.analysis_tests.conftest import Stores


def _summary(rows: list[tuple[int, float, str]]) -> pd.DataFrame:
    """trial_table-like rows: (batch size, lr, status), one trial each."""
    return pd.DataFrame(
        [{"trial": i, "batch_size": b, "lr": lr, "status": s} for i, (b, lr, s) in enumerate(rows)]
    ).astype({"batch_size": "Int64"})


def _bracket(rows: list[tuple[int, float, str]], best_lr: float, batch_size: int = 64) -> pd.Series:
    summary = _summary(rows)
    best = summary[(summary["batch_size"] == batch_size) & (summary["lr"] == best_lr)].head(1)
    brackets = frontier.lr_brackets(summary, best[["batch_size", "trial", "lr"]])
    assert len(brackets) == 1
    return brackets.iloc[0]


@pytest.mark.parametrize(
    ("rows", "best", "kind", "below", "above"),
    [
        # A worse lr tried on each side; the nearest ones are the bracket.
        ([(64, 0.01, "ok"), (64, 0.03, "ok"), (64, 0.1, "ok"), (64, 0.3, "pruned")], 0.1, "bracketed", 0.03, 0.3),
        # The best is the lowest lr tried: bracketed from above only.
        ([(64, 0.01, "ok"), (64, 0.03, "ok")], 0.01, "lowest", math.nan, 0.03),
        # The best is the highest lr tried: bracketed from below only.
        ([(64, 0.01, "ok"), (64, 0.03, "ok")], 0.03, "highest", 0.01, math.nan),
        # The next lr up diverged: bracketed, with a divergence as its upper side.
        ([(64, 0.01, "ok"), (64, 0.03, "ok"), (64, 0.1, "diverged")], 0.03, "diverged above", 0.01, 0.1),
        # One lr tried (twice): no bracket at all.
        ([(64, 0.02, "ok"), (64, 0.02, "ok")], 0.02, "only", math.nan, math.nan),
        # A crash and an out-of-memory above say nothing about the lr; other batch sizes do not count.
        (
            [(64, 0.01, "ok"), (64, 0.03, "ok"), (64, 0.1, "failed"), (64, 0.3, "oom"), (128, 0.1, "ok")],
            0.03,
            "highest",
            0.01,
            math.nan,
        ),
        # A diverged and a finite trial at the upper neighbour: the finite one is a measured worse value.
        ([(64, 0.01, "ok"), (64, 0.03, "ok"), (64, 0.1, "diverged"), (64, 0.1, "ok")], 0.03, "bracketed", 0.01, 0.1),
    ],
    ids=["both-sides", "low-edge", "high-edge", "diverged-above", "single-lr", "crash-ignored", "mixed-neighbour"],
)
def test_bracket_kind(rows: list[tuple[int, float, str]], best: float, kind: str, below: float, above: float) -> None:
    bracket = _bracket(rows, best)
    assert bracket["kind"] == kind
    assert bracket["lr"] == best
    for got, expected in ((bracket["lr_below"], below), (bracket["lr_above"], above)):
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("bracketed", "0.0562 – 0.158"),
        ("diverged above", "0.0562 – 0.158 (diverged above)"),
        ("lowest", "≤ 0.1 (edge)"),
        ("highest", "≥ 0.1 (edge)"),
        ("only", "0.1 only"),
    ],
)
def test_bracket_text(kind: str, expected: str) -> None:
    lr_below, lr_above = (0.0562, 0.158) if kind in ("bracketed", "diverged above") else (math.nan, math.nan)
    assert frontier.bracket_text(kind, 0.1, lr_below, lr_above) == expected


def _result(kinds: dict[int, str], basis: str = "fastest") -> SweepAnalysis:
    brackets = pd.DataFrame(
        [(b, i, 0.1, 0.05, 0.2, kind) for i, (b, kind) in enumerate(kinds.items())], columns=frontier.BRACKET_COLUMNS
    )
    return cast(SweepAnalysis, SimpleNamespace(lr_brackets=brackets, lr_basis=basis))


def test_findings_sentence_when_every_optimum_is_bracketed() -> None:
    sentence = bracket_sentence(_result({16: "bracketed", 64: "bracketed", 256: "diverged above"}))
    assert sentence is not None
    assert sentence.startswith("Every batch size's learning rate fastest to the target is bracketed")
    assert "not bracketed" not in sentence
    assert "At 256 the next lr up diverged" in sentence


def test_findings_sentence_names_the_unbracketed_batch_sizes() -> None:
    sentence = bracket_sentence(
        _result({16: "lowest", 64: "bracketed", 512: "only", 2048: "highest"}, basis="objective")
    )
    assert sentence is not None
    assert "The best learning rate is not bracketed at batch sizes 16 (lowest lr tried), 512 (only lr tried), " in (
        sentence
    )
    assert "2048 (highest lr tried)" in sentence
    assert "widen the lr range there" in sentence and "try more than one lr" in sentence
    assert "bracketed at 1 of 4 batch sizes" in sentence
    assert bracket_sentence(_result({})) is None


# --- B_crit against compute ------------------------------------------------------------------


def _sweep_tables(batch_sizes: list[int], *, b_crit: float = 128.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials and history of a made-up sweep: per batch size three lrs, two seeds each; the middle
    lr reaches the target at S(B) = 100(1 + B_crit/B) (with noise), the others 1.5× later or never.
    Trials complete in the reverse of their numbers (end_time), to check the order used."""
    rng = np.random.default_rng(0)
    rows, history = [], []
    trial = 0
    for b in batch_sizes:
        for factor in (1.5, 1.0, math.inf):
            for seed in (0, 1):
                steps = factor * 100 * (1 + b_crit / b) * math.exp(rng.normal(0, 0.05))
                run_id = f"r{trial}-{seed}"
                last = 400 + 10 * trial
                rows.append({"trial": trial, "seed": seed, "run_id": run_id, "batch_size": b, "lr": factor,
                             "end_time": 1e6 - trial, tables.STEPS: steps, tables.SAMPLES: steps * b})  # fmt: skip
                history += [{"run_id": run_id, "key": "train/loss", "step": s, "value": 1.0} for s in (0, last)]
            trial += 1
    trials = pd.DataFrame(rows).astype({"batch_size": "Int64"})
    trials.loc[~np.isfinite(trials[tables.STEPS]), [tables.STEPS, tables.SAMPLES]] = np.nan
    return trials, pd.DataFrame(history)


def test_b_crit_progress_ends_at_the_fit_of_all_trials() -> None:
    trials, history = _sweep_tables([16, 32, 64, 128, 256, 512])
    progress, note = frontier.b_crit_progress(trials, history)

    assert note == ""
    assert 2 <= len(progress) <= 10
    assert progress["trials"].is_monotonic_increasing and progress["trials"].is_unique
    assert progress["compute"].is_monotonic_increasing
    # Compute: Σ over the trials completed so far of last step × batch size, in order of completion
    # (here the reverse of the trial numbers).
    for row in progress.itertuples():
        done = trials[trials["trial"] >= trials["trial"].max() + 1 - row.trials]
        expected = ((400 + 10 * done["trial"]) * done["batch_size"].astype(float)).sum()
        assert row.compute == pytest.approx(expected)
        assert row.n_batch_sizes >= frontier.MIN_BATCH_SIZES
    _, points = tables.fastest_to_target(trials)
    fit = fit_critical_batch(points["batch_size"], points[tables.STEPS], samples_to_target=points[tables.SAMPLES])
    assert fit is not None
    last = progress.iloc[-1]
    assert last["trials"] == trials["trial"].nunique()
    assert (last["b_crit"], last["b_crit_low"], last["b_crit_high"]) == (fit.b_crit, fit.b_crit_low, fit.b_crit_high)
    # The interval narrows as batch sizes and seeds accrue.
    first = progress.iloc[0]
    assert last["b_crit_high"] / last["b_crit_low"] <= first["b_crit_high"] / first["b_crit_low"]


def test_b_crit_progress_says_why_it_is_empty() -> None:
    trials, history = _sweep_tables([16, 64])
    progress, note = frontier.b_crit_progress(trials, history)
    assert progress.empty and note.startswith("Only 2 batch sizes reached the target")

    trials[[tables.STEPS, tables.SAMPLES]] = np.nan
    progress, note = frontier.b_crit_progress(trials, history)
    assert progress.empty and "No trial reached the validation target" in note

    progress, note = frontier.b_crit_progress(trials.iloc[:0], history.iloc[:0])
    assert progress.empty and "No trial has a run" in note


def test_b_crit_progress_rejects_bad_arguments() -> None:
    trials, history = _sweep_tables([16, 64, 256])
    with pytest.raises(ValueError, match="checkpoints=0"):
        frontier.b_crit_progress(trials, history, checkpoints=0)
    with pytest.raises(ValueError, match="first=0"):
        frontier.b_crit_progress(trials, history, first=0)


def test_report_says_why_b_crit_is_not_followed(stores: Stores, tmp_path: Path) -> None:
    # No run of "no-target" reached its target: a panel and a line say so instead of a chart.
    sweep = load_sweep("no-target", storage=stores.storage, tracking_uri=stores.tracking_uri)
    index = render_report([sweep], out_dir=tmp_path, strict=True, write_images=False)
    summary = (index.parent / "summary.md").read_text()
    assert "### B_crit against compute\n\nNot fitted. No trial reached the validation target" in summary
    assert 'alt="B_crit against compute"' in index.read_text()
