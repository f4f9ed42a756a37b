"""The `batchscope` command line."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NoReturn

import batchscope
from batchscope.sweeps.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (see sweeps/configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=300 (repeatable)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (its own print the usage first), exit code 2 as before."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _whole_number(low: int, high: int | Callable[[], int] | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], checked as the command line is read
    (before any worker starts); `high` may be computed when first needed."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        top = high() if callable(high) else high
        if value < low or (top is not None and value > top):
            bound = f"at least {low}" if top is None else f"between {low} and {top:,}"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {text}")
        return value

    return whole_number


def _positive_number(high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number above 0 (float() also reads 'inf' and 'nan')."""

    def positive_number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0 and (high is None or value <= high)):
            bound = "" if high is None else f" and at most {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number above 0{bound}, got {text}")
        return value

    return positive_number


def _bounds() -> ModuleType:
    """sweeps.config_bounds, imported only when an argument's bound needs it."""
    from batchscope.sweeps import config_bounds

    return config_bounds


def max_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 4 * cpus


# Each trial worker is a training process with its own PyTorch; past a few per core they only wait
# for each other (and hold memory), so more is a typo.
_WORKERS = _whole_number(1, max_workers, " (4 per CPU core here)")
_TRIALS = _whole_number(1, lambda: _bounds().MAX_TRIALS)
_BATCH = _whole_number(1, lambda: _bounds().MAX_BATCH)
_SEED = _whole_number(0, lambda: _bounds().SEED_MAX, " (numpy's seed range)")
# Timed passes or batch pairs: a million is hours of measuring; more is a typo.
_REPEATS = 10**6


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchscope",
        description="Which batch size, with which learning rate, and what does it cost? "
        "Optuna sweeps of real PyTorch training, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"batchscope {batchscope.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sweep", help="run or continue a batch-size × learning-rate sweep")
    _add_config_args(p)
    p.add_argument(
        "--n-trials", type=_TRIALS, default=None, help="total trials for the study (default: search.n_trials)"
    )
    p.add_argument("--force", action="store_true", help="continue a study even though its config changed")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--workers", type=_WORKERS, default=1, help="trials run at a time on this machine (default 1)")

    p = sub.add_parser("worker", help="join a shared study (PostgreSQL + MLflow server) and run its trials")
    _add_config_args(p)
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by all workers, e.g. postgresql://...")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking server, e.g. http://mlflow:5000")
    p.add_argument("--workers", type=_WORKERS, default=1, help="trials at a time in this process (default 1)")
    p.add_argument("--n-trials", type=_TRIALS, default=None, help="total trials for the study across all workers")

    p = sub.add_parser("server", help="start an MLflow tracking server (PostgreSQL backend), or check one")
    p.add_argument("--backend-store-uri", default=None, help="e.g. postgresql://user@host/mlflow")
    p.add_argument("--artifacts-destination", default="./mlartifacts", help="where the server keeps artifacts")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--check", metavar="URL", default=None, help="only check that the server at URL answers")

    p = sub.add_parser("train", help="one tracked training run, without Optuna")
    _add_config_args(p)
    p.add_argument(
        "--batch-size", type=_BATCH, default=None, help="batch size (default: the search space's middle value)"
    )
    p.add_argument(
        "--lr", type=_positive_number(), default=None, help="learning rate (default: the geometric middle of the range)"
    )
    p.add_argument("--seed", type=_SEED, default=None, help="seed (default: the first of train.seeds)")

    p = sub.add_parser("status", help="a table of a study's trials")
    p.add_argument("study", nargs="?", default=None, help="study name (default: list the studies)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: mlruns/optuna.journal)")

    p = sub.add_parser("autobatch", help="find the largest batch size that fits in memory, and show how")
    _add_config_args(p)
    p.add_argument(
        "--fraction", type=_positive_number(1.0), default=0.9, help="share of free memory to use (default 0.9)"
    )
    p.add_argument(
        "--budget-mb", type=_positive_number(), default=None, help="a peak-memory budget in MB instead of --fraction"
    )
    p.add_argument("--max-batch", type=_BATCH, default=65536, help="largest batch size to consider (default 65536)")

    p = sub.add_parser("throughput", help="inference throughput and latency across batch sizes, logged to MLflow")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="an MLflow run id with weights/model.pt, or a weights file")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256,512,1024", help="comma-separated batch sizes")
    p.add_argument(
        "--iters", type=_whole_number(2, _REPEATS), default=50, help="timed forward passes per batch size (default 50)"
    )

    p = sub.add_parser("noise-scale", help="measure the gradient noise scale B_simple of the config's model")
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="an MLflow run id with weights/model.pt, or a weights file (a state_dict .pt or a batchscope checkpoint)",
    )
    p.add_argument("--b-small", type=_BATCH, default=None, help="small batch size (default: b_big / 8)")
    p.add_argument("--b-big", type=_BATCH, default=None, help="big batch size (default: 512, at most the training set)")
    p.add_argument(
        "--batches",
        type=_whole_number(2, _REPEATS, " (two or more give an uncertainty)"),
        default=None,
        help="a fixed number of batch pairs (default: see --precision)",
    )
    p.add_argument(
        "--precision",
        type=_positive_number(),
        default=0.1,
        help="target relative std. error of B_simple (default 0.1)",
    )
    p.add_argument(
        "--max-batches",
        type=_whole_number(1, _REPEATS),
        default=1024,
        help="most batch pairs for --precision (default 1024)",
    )
    p.add_argument("--seed", type=_SEED, default=None, help="seed for the model's initialization and the batches")

    p = sub.add_parser("report", help="write the comparison report of one or more studies (HTML + Markdown)")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="study name(s); several are compared side by side")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: mlruns/optuna.journal)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    p.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p.add_argument("--svg", action="store_true", help="write the charts as SVG instead of PNG")
    p.add_argument("--ui-url", default="http://127.0.0.1:5000", help="MLflow UI address used for run links")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's MLflow run")

    p = sub.add_parser("export", help="write a study's trials and metric histories as CSV or Parquet")
    p.add_argument("study", help="study name")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv", help="file format (default csv)")
    p.add_argument("--out", default=".", help="output folder (default: the current one)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: mlruns/optuna.journal)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")

    p = sub.add_parser("ui", help="open the MLflow UI (or optuna-dashboard) on the local stores")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default 5000; 8080 for --optuna)")
    p.add_argument("--optuna", action="store_true", help="open optuna-dashboard on the study storage instead")
    p.add_argument("--storage", default=None, help="Optuna storage URL for --optuna")
    p.add_argument("--tracking-uri", default=None, help="MLflow backend store (default: sqlite:///mlruns/mlflow.db)")

    p = sub.add_parser("doctor", help="check both stores of the sweeps; --repair fixes what can be fixed safely")
    p.add_argument("study", nargs="?", default=None, help="study name (default: every study)")
    p.add_argument("--repair", action="store_true", help="repair, after backing up each file it changes")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: mlruns/optuna.journal)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns/mlflow.db)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (said on one line by _Parser): a code, not a raise
        return exc.code if isinstance(exc.code, int) else 2
    from rich.console import Console

    err = Console(stderr=True)
    restore = _sigterm_like_ctrl_c()
    try:
        return int(_handler(args.command)(args) or 0)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except Terminated:
        err.print("[yellow]terminated[/] (SIGTERM): the stores are consistent; run the same command again to continue.")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: the stores are consistent; run the same command again to continue.")
        return 130
    finally:
        restore()


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs `command` (imported now: the commands load what they need)."""
    from batchscope.sweeps import commands, commands_measure, commands_servers

    def doctor(args: argparse.Namespace) -> int:
        from batchscope.sweeps.doctor import cmd_doctor  # optuna, the journal tools: only for doctor

        return cmd_doctor(args)

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "sweep": commands.cmd_sweep,
        "worker": commands.cmd_worker,
        "server": commands_servers.cmd_server,
        "train": commands.cmd_train,
        "status": commands.cmd_status,
        "autobatch": commands_measure.cmd_autobatch,
        "throughput": commands_measure.cmd_throughput,
        "noise-scale": commands_measure.cmd_noise_scale,
        "report": commands.cmd_report,
        "export": commands.cmd_export,
        "ui": commands_servers.cmd_ui,
        "doctor": doctor,
    }
    return handlers[command]


class Terminated(KeyboardInterrupt):
    """SIGTERM, as Slurm, Kubernetes and `kill` send it: handled like Ctrl-C (the running trials are
    marked and their runs closed; a second one stops them at once)."""


def _sigterm_like_ctrl_c() -> Callable[[], None]:
    """Raise `Terminated` in the main thread on SIGTERM; returns what puts the old handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def on_sigterm(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
