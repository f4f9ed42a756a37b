"""What `batchscope doctor` reports: one `Finding` per thing it looked at."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Finding:
    """One thing the doctor looked at: a problem (with the repair it allows, if any), or a note."""

    where: str
    what: str
    level: str = "problem"  # "problem", "note" (worth knowing, nothing to repair) or "ok"
    repair: str = ""  # what --repair does about it; "" when it cannot be repaired safely
    fix: Callable[[], str] | None = None  # does the repair; returns what it did
    touches: tuple[str, ...] = ()  # the stores the repair writes to: "journal", "mlflow"
    done: str = ""  # after --repair: what was done, or why not

    @property
    def problem(self) -> bool:
        return self.level == "problem"

    @property
    def open(self) -> bool:
        return self.problem and not self.done.startswith("repaired")
