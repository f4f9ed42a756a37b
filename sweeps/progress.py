"""A sweep's progress display: the hooks it calls, and their two drawings.

`RichReporter` (the CLI) shows trials done/total, each running trial's steps and loss, and the
best so far; `QuietReporter` (tests, benchmarks, the library) shows nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


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
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self._sweep = self.progress.add_task("trials", total=1, info="", visible=False)
        self._trials: dict[int, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def sweep_started(self, study: str, done: int, total: int) -> None:
        self.progress.update(
            self._sweep, description=f"[bold]{escape(study)}[/] trials", total=total, completed=done, visible=True
        )

    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None:
        desc = f"  trial {number} bs={params['batch_size']} lr={params['lr']:.3g} seed={seed}"
        with self._lock:
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
        if task is not None:
            self.progress.remove_task(task)
        shown = "→ " + ", ".join(f"{v:.4g}" for v in values) if values else ""
        self.progress.console.print(f"trial {number}: {status} {shown}", highlight=False)
        self.progress.update(
            self._sweep, advance=0 if status == "failed" else 1, info=f"best {escape(best)}" if best else ""
        )

    def message(self, text: str) -> None:
        self.progress.console.print(escape(text), highlight=False)
