"""What a sweep prints for a person reading its log: the reporter's lines, written to a file."""

from __future__ import annotations

import io
import re

from rich.console import Console

from batchscope.sweeps.progress import RichReporter, duration


def test_each_finished_trial_is_one_line_with_its_parameters_result_time_and_the_eta() -> None:
    buf = io.StringIO()
    with RichReporter(Console(file=buf, width=200)) as reporter:  # not a terminal: no live bars
        reporter.sweep_started("demo", done=2, total=6)
        reporter.trial_started(3, {"batch_size": 256, "lr": 0.5183}, seed=0, max_steps=100)
        reporter.trial_started(3, {"batch_size": 256, "lr": 0.5183}, seed=1, max_steps=100)  # its second seed
        reporter.trial_finished(3, "ok", [0.64481], best="val_acc=0.6448 (bs=256, lr=0.518)")
        reporter.trial_started(4, {"batch_size": 16, "lr": 2.0}, seed=0, max_steps=100)
        reporter.trial_finished(4, "failed", None, best=None)
        reporter.message("stopping")
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d trial 3 bs=256 lr=0\.518: ok → 0\.6448 in \d+\.\d s · 3/6 · eta .+ s", lines[0]
    )
    # A failed trial re-runs: the count stays, the ETA is still there.
    assert re.fullmatch(r"\d\d:\d\d:\d\d trial 4 bs=16 lr=2: failed in \d+\.\d s · 3/6 · eta .+", lines[1])
    assert re.fullmatch(r"\d\d:\d\d:\d\d stopping", lines[2])
    assert [line for line in lines[3:] if line.strip()] == []  # no last frame of the bars in a file


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (4.26, 245, 3725)] == ["4.3 s", "4 min 5 s", "1 h 02 min"]
