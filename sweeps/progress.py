"""A sweep's progress display: the hooks it calls (`Reporter`), and their two drawings.

`QuietReporter` (tests, benchmarks, the library) shows nothing. `RichReporter` (the CLI): in a
terminal, live bars (the sweep's with its ETA, one per running trial). Either way, and alone
when the output goes to a file or a batch job's log, one line per finished trial that can be read
on its own: the time, the trial with its batch size and lr, its status, objective and duration,
and the sweep's count and ETA.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass
class _Running:
    label: str  # "trial 3 bs=256 lr=0.518"
    started: float  # time.monotonic() at its first seed


def clock() -> str:
    """The wall-clock prefix of every line a sweep prints (a log read later needs the time)."""
    return time.strftime("%H:%M:%S")


def duration(seconds: float) -> str:
    """12.3 s, 4 min 5 s, 1 h 02 min: short, and exact enough to plan by."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Reporter(Protocol):
    """Progress display hooks; the CLI draws them with rich, tests pass `QuietReporter`."""

    def sweep_started(self, study: str, done: int, total: int) -> None: ...
    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None: ...
    def trial_step(self, number: int, step: int, loss: float | None) -> None: ...
    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None: ...
    def message(self, text: str) -> None: ...


class QuietReporter:
    def sweep_started(self, study: str, done: int, total: int) -> None: ...
    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None: ...
    def trial_step(self, number: int, step: int, loss: float | None) -> None: ...
    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None: ...
    def message(self, text: str) -> None: ...


class RichReporter:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            # Not a terminal (a log file, a batch job): the per-trial lines say it all; the bars'
            # last frame, squeezed to 80 columns, only added a garbled line at the end.
            transient=not self.console.is_terminal and not self.console.is_jupyter,
        )
        self._sweep = self.progress.add_task("trials", total=1, info="", visible=False)
        self._trials: dict[int, TaskID] = {}
        self._running: dict[int, _Running] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._done = 0  # trials finished by this process (any status): the ETA's rate
        self._finished = 0  # the study's count that n_trials is judged on
        self._total = 1

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def sweep_started(self, study: str, done: int, total: int) -> None:
        self._started, self._finished, self._total = time.monotonic(), done, total
        self.progress.update(
            self._sweep, description=f"[bold]{escape(study)}[/] trials", total=total, completed=done, visible=True
        )

    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None:
        label = f"trial {number} bs={params['batch_size']} lr={params['lr']:.3g}{extra_params(params)}"
        desc = f"  {label} seed={seed}"
        with self._lock:
            self._running.setdefault(number, _Running(label, time.monotonic()))
            task = self._trials.get(number)
            if task is None:
                self._trials[number] = self.progress.add_task(desc, total=max_steps, info="")
            else:
                self.progress.reset(task, total=max_steps, description=desc, info="")

    def trial_step(self, number: int, step: int, loss: float | None) -> None:
        task = self._trials.get(number)
        if task is not None:
            self.progress.update(task, completed=step, info=f"loss {loss:.4f}" if loss is not None else "")

    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None:
        with self._lock:
            task = self._trials.pop(number, None)
            running = self._running.pop(number, None)
            self._done += 1
            self._finished += status != "failed"  # a failed trial is re-run: it does not count
            line = self._line(number, status, values, running)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.console.print(escape(line), highlight=False)
        self.progress.update(
            self._sweep, advance=0 if status == "failed" else 1, info=f"best {escape(best)}" if best else ""
        )

    def _line(self, number: int, status: str, values: list[float] | None, running: _Running | None) -> str:
        """`12:03:44 trial 7 bs=256 lr=0.518: ok → 0.6448 in 12.3 s · 8/72 · eta 9 min 40 s`."""
        label = running.label if running else f"trial {number}"
        shown = " → " + ", ".join(f"{v:.4g}" for v in values) if values else ""
        took = f" in {duration(time.monotonic() - running.started)}" if running else ""
        left = max(self._total - self._finished, 0)
        # This process's pace so far (wall time over its finished trials, all slots together).
        eta = f" · eta {duration(left * (time.monotonic() - self._started) / self._done)}" if left else ""
        return f"{clock()} {label}: {status}{shown}{took} · {self._finished}/{self._total}{eta}"

    def message(self, text: str) -> None:
        self.progress.console.print(escape(f"{clock()} {text}"), highlight=False)


def param_text(value: Any) -> str:
    """A param as a person reads it: floats to 3 significant digits, the rest as is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def extra_params(params: Mapping[str, Any]) -> str:
    """` wd=0.01 beta2=0.99`: a trial's `search.params` after its batch size and lr (empty without)."""
    return "".join(f" {k}={param_text(v)}" for k, v in params.items() if k not in ("batch_size", "lr"))
