"""Rich progress for a sweep: trials done/total, the current trial's steps and loss, best so far."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichReporter:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._sweep = self.progress.add_task("trials", total=1, info="", visible=False)
        self._trial = self.progress.add_task("trial", total=1, info="", visible=False)
        self._best: str | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def sweep_started(self, study: str, done: int, total: int) -> None:
        self.progress.update(
            self._sweep,
            description=f"[bold]{_esc(study)}[/] trials",
            total=total,
            completed=done,
            visible=True,
            info="",
        )

    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None:
        desc = f"  trial {number} bs={params['batch_size']} lr={params['lr']:.3g} seed={seed}"
        self.progress.reset(self._trial, total=max_steps, description=desc, info="", visible=True)

    def trial_step(self, step: int, loss: float | None) -> None:
        info = f"loss {loss:.4f}" if loss is not None else ""
        self.progress.update(self._trial, completed=step, info=info)

    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None:
        self._best = best
        shown = ", ".join(f"{v:.4g}" for v in values) if values else status
        self.progress.console.log(f"trial {number}: {status} {'→ ' + shown if values else ''}")
        self.progress.update(
            self._sweep, advance=1 if status != "failed" else 0, info=f"best {_esc(best)}" if best else ""
        )


def _esc(text: str | None) -> str:
    from rich.markup import escape

    return escape(text or "")
