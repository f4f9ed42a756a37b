"""What every section shares: timings, paired ratios, the machine, and the result of a section.

The machines these run on are shared and often loaded, so a figure is never an absolute
time taken alone: it is a ratio of two things measured side by side in the same process,
alternating, repeated, and summarised by the median of the per-pair ratios (with their
range, so a reader sees how much the load moved them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU seconds (all threads of this process) of one measured call."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], Any]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


@dataclass(frozen=True)
class Ratio:
    """Median of per-pair ratios, with the smallest and largest pair."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Ratio:
        return cls(statistics.median(values), min(values), max(values))

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"

    def percent(self) -> str:
        """The ratio read as a cost: 1.08 → +8% (range)."""
        return f"{100 * (self.median - 1):+.0f}% ({100 * (self.low - 1):+.0f}…{100 * (self.high - 1):+.0f}%)"


@dataclass
class Section:
    """The outcome of one benchmark section, printed as a table and written to the README."""

    name: str
    title: str
    target: str
    verdict: str  # "met", "missed", "skipped", or a short mixed verdict
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    quick: bool = False
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    measured_at: str = ""
    code: str = ""  # the commit and a digest of trainers/ + sweeps/ when it was measured

    def markdown(self, level: int = 3) -> str:
        hashes = "#" * level
        mode = "quick" if self.quick else "full"
        la, lb = self.load_before, self.load_after
        lines = [
            f"{hashes} {self.title}",
            "",
            f"Target: {self.target}. **Verdict: {self.verdict}.**",
            "",
            f"_Measured {self.measured_at} ({mode} mode, {self.seconds:.0f} s); load average "
            f"{la[0]:.1f} before, {lb[0]:.1f} after (1-min), on {os.cpu_count()} cores; code: {self.code}._",
            "",
        ]
        for table in self.tables:
            lines += [table, ""]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def run_section(name: str, fn: Callable[[bool], Section], quick: bool) -> Section:
    load_before = os.getloadavg()
    code = f"commit {git_commit()}, digest {code_digest()}"
    started = time.perf_counter()
    section = fn(quick)
    section.name = name
    section.seconds = time.perf_counter() - started
    section.quick = quick
    section.load_before = load_before
    section.load_after = os.getloadavg()
    section.measured_at = now_text()
    section.code = code
    return section


def now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub table; `align` is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- the machine and the code ------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def git_commit() -> str:
    """The checked-out commit, read from .git without running git."""
    git = REPO / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <its folder under the main repository's .git>"
            git = Path(git.read_text().strip().removeprefix("gitdir: "))
        head = (git / "HEAD").read_text().strip()
        common = git / "commondir"  # a worktree's branches are the main repository's
        git_refs = (git / common.read_text().strip()).resolve() if common.is_file() else git
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        if (git_refs / ref).exists():
            return (git_refs / ref).read_text().strip()[:12]
        for line in (git_refs / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def cache_root() -> Path:
    """Where benchmarks keep what is slow to make (stores, trained runs): $BATCHSCOPE_BENCH_CACHE or the temp folder."""
    return Path(os.environ.get("BATCHSCOPE_BENCH_CACHE") or Path(tempfile.gettempdir()) / "batchscope-bench")


def code_digest(packages: tuple[str, ...] = ("trainers", "sweeps")) -> str:
    """A hash of the measured code (trainers/ and sweeps/), since the tree may hold uncommitted changes."""
    h = hashlib.sha256()
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def machine() -> dict[str, str]:
    import mlflow
    import optuna
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores ({affinity} usable)",
        "ram": f"{ram_gib():.0f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "optuna": optuna.__version__,
        "code": f"commit {git_commit()}, trainers/+sweeps/ digest {code_digest()}",
    }


def quiet() -> None:
    """MLflow's and alembic's INFO lines (database creation) would drown the tables."""
    import logging

    from batchscope.sweeps.store_setup import quiet_libraries

    quiet_libraries()
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
