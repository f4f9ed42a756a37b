"""What each `batchscope` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.locations import check_storage, check_tracking_uri, redact
from batchscope.sweeps.progress import extra_params, param_text

if TYPE_CHECKING:
    from batchscope.analysis.load import SweepData
    from batchscope.sweeps.config import SweepConfig
    from batchscope.sweeps.runner import Sweep, SweepSummary

# Tables stay readable when piped or captured (rich would fold them to 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    # The config is read and checked before any worker starts: a typo costs the 1 s it takes to
    # read, not the start (and stop) of N torch processes.
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials must be at least 1, got {args.n_trials}")
    cfg = load_config(args.config, args.overrides)
    check_store_urls(cfg)
    sweep = open_sweep(cfg, workers=args.workers, force=args.force)
    return _run_sweep(args, cfg, sweep)


def open_sweep(cfg: SweepConfig, *, workers: int, force: bool = False) -> Sweep:
    """The sweep's stores, study and parent run, opened while its `workers` trial workers start."""
    with _starting(cfg.study, workers), _early_workers(workers) as early:
        from batchscope.sweeps.runner import Sweep

        return Sweep(cfg, force=force, prestarted=early)


def check_store_urls(cfg: SweepConfig) -> None:
    """The config's store URLs checked for form (scheme, host, database, a file's folder) before
    the heavy imports and any trial worker: a mistyped URL took 29 s to report with --workers 8
    (eight torch processes started, then stopped) and 6-9 s with one. Whether the servers answer
    is checked by the sweep itself, while its workers start."""
    if cfg.storage is not None:
        check_storage(cfg.storage)
    if cfg.tracking_uri is not None:
        check_tracking_uri(cfg.tracking_uri)


def run_with_progress(sweep: Sweep, n_trials: int | None, workers: int) -> SweepSummary:
    """Run the sweep's trials with rich progress on stderr (a live display in a terminal or Jupyter)."""
    from batchscope.sweeps.progress import RichReporter

    with RichReporter(err) as reporter:
        return sweep.run(n_trials, reporter, workers=workers)


def _starting(study: str, workers: int) -> contextlib.AbstractContextManager[object]:
    """On screen within a second of the command, while the next seconds go to imports and stores
    (about 20 s on a loaded machine before the first trial's bar appeared, with nothing shown).

    A transient status line: it is gone once the trials' progress starts, so that a store that
    cannot be opened still ends the command with its one error line; not written to a log file.
    """
    each = "each loads" if workers > 1 else "it loads"
    return err.status(
        f"{escape(study)}: starting {workers} trial worker{'s' if workers > 1 else ''} "
        f"({each} PyTorch: a few seconds) and opening the stores"
    )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """batchscope.sweeps.config_load.load_config, imported when first used (building its pydantic models takes
    0.3 s, which commands that need no config do not spend)."""
    from batchscope.sweeps.config_load import load_config as load

    return load(path, overrides)


@contextlib.contextmanager
def _early_workers(n: int) -> Iterator[list[Any]]:
    """Start the trial workers before the stores are opened, so their imports (torch, mlflow)
    overlap with the sweep's set-up.

    On a user error before the sweep starts they are stopped again; nothing is written.
    """
    from batchscope.sweeps.worker import TrialWorker

    if n < 1:
        raise UserError(f"--workers must be at least 1, got {n}")
    workers = [TrialWorker() for _ in range(n)]
    try:
        yield workers
    except BaseException:
        # They have run nothing: stop them at once rather than wait for their imports to finish.
        for w in workers:
            w.kill()
            w.close()
        raise


def _run_sweep(args: argparse.Namespace, cfg: Any, sweep: Any) -> int:
    summary = run_with_progress(sweep, args.n_trials, args.workers)
    _print_best(sweep)
    report_path = None
    if cfg.report.auto and not args.no_report:
        report_path = write_sweep_report(sweep)
    out.print()
    out.print(f"[bold]{escape(cfg.study)}[/]: {summary.completed}/{summary.total} trials finished.")
    out.print(f"  Optuna study:   {escape(summary.storage)}")
    out.print(f"  MLflow runs:    {escape(redact(summary.tracking_uri))} (experiment {escape(cfg.study)})")
    if report_path is not None:
        out.print(f"  Report:         {report_path}")
    out.print("  Look at it:     [bold]batchscope ui[/]  then open http://127.0.0.1:5000")
    out.print(f"  Trials table:   batchscope status {escape(_quote(cfg.study))}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.storage is not None:
        overrides.append(f"storage={args.storage}")
    if args.tracking_uri is not None:
        overrides.append(f"tracking_uri={args.tracking_uri}")
    cfg = load_config(args.config, overrides)
    if cfg.storage is None:
        raise UserError(
            "a worker needs a shared study: give --storage postgresql://... (or set storage: in the config); "
            "on one machine use batchscope sweep --workers N"
        )
    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials must be at least 1, got {args.n_trials}")
    check_store_urls(cfg)
    from batchscope.sweeps.progress import RichReporter

    with _starting(cfg.study, args.workers):
        from batchscope.sweeps.runner import Sweep

        sweep = Sweep(cfg)
    with RichReporter(err) as reporter:
        summary = sweep.run(args.n_trials, reporter, workers=args.workers, shared=True)
    ran = sum(1 for o in summary.outcomes if o.status != "failed")
    out.print(f"worker done: ran {ran} trial(s); the study has {summary.completed}/{summary.total} finished.")
    return 0


def write_sweep_report(sweep: Any) -> Path | None:
    """The report at the end of a sweep; a failure here never loses the sweep's results."""
    from batchscope.analysis.report import build_report, log_report_artifacts

    try:
        path = build_report(
            [sweep.cfg.study],
            storage=sweep.storage,
            tracking_uri=sweep.stores.tracking_uri,
            out_dir=Path(sweep.cfg.report.out_dir),
        )
        log_report_artifacts(path, [sweep.cfg.study], tracking_uri=sweep.stores.tracking_uri)
    except Exception as exc:  # the sweep is done and stored; say why the report is missing
        err.print(f"[yellow]The report could not be written[/]: {escape(redact(str(exc)))[:300]}")
        err.print(f"Try again with: batchscope report {escape(_quote(sweep.cfg.study))}")
        return None
    return Path(path)


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(
        args.studies,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        out=args.out,
        ui_url=args.ui_url,
        svg=args.svg,
        log=not args.no_log,
    )
    out.print(f"Report: {path}")
    out.print(f"Summary: {Path(path).parent / 'summary.md'}")
    return 0


def write_report(
    studies: Sequence[str],
    *,
    storage: str | None,
    tracking_uri: str | None,
    out: str | Path,
    ui_url: str,
    svg: bool = False,
    log: bool = True,
) -> Path:
    """What `batchscope report` writes (and batchscope.report): the stores checked, the report of
    `studies` written under `out`, and logged to each study's sweep run unless `log` is False."""
    from batchscope.sweeps.locations import check_output_folder

    out_dir = check_output_folder(out, "--out")  # before anything is read: a bad folder costs nothing
    stores = _analysis_stores(storage, tracking_uri)
    from batchscope.analysis.report import build_report, log_report_artifacts  # 3-5 s of imports: after the checks

    with _store_errors(stores):
        path = build_report(
            studies,
            storage=_optuna_storage(stores),
            tracking_uri=stores.tracking_uri,
            out_dir=out_dir,
            tracking_ui=ui_url,
            image_format="svg" if svg else "png",
        )
        if log:
            log_report_artifacts(path, studies, tracking_uri=stores.tracking_uri)
    return Path(path)


def load_data(study: str, *, storage: str | None = None, tracking_uri: str | None = None) -> SweepData:
    """One study read from its stores, checked first (what `batchscope export` writes out, and
    batchscope.load returns); a missing study or store is a UserError of one line."""
    stores = _analysis_stores(storage, tracking_uri)
    from batchscope.analysis.load import load_sweep

    with _store_errors(stores):
        return load_sweep(study, storage=_optuna_storage(stores), tracking_uri=stores.tracking_uri)


def cmd_export(args: argparse.Namespace) -> int:
    from batchscope.sweeps.locations import check_output_folder

    out_dir = check_output_folder(args.out, "--out")  # before anything is read: a bad folder costs nothing
    data = load_data(args.study, storage=args.storage, tracking_uri=args.tracking_uri)
    from batchscope.analysis.load import export_sweep

    for path in export_sweep(data, out_dir, file_format=args.format):
        out.print(f"wrote {path}")
    return 0


@contextlib.contextmanager
def _store_errors(stores: Any) -> Iterator[None]:
    """A study or store that is not there, or not what it should be, is the user's to fix: one
    line, no traceback (and no password, whatever the driver echoed)."""
    try:
        yield
    except (LookupError, FileNotFoundError) as exc:
        raise UserError(redact(str(exc).strip("'\""))) from None
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        from batchscope.sweeps.store_setup import driver_error

        raise UserError(
            f"the MLflow store {redact(stores.tracking_uri)!r} could not be read: "
            f"{driver_error(exc, stores.tracking_uri)[:300]}"
        ) from None


def _is_store_error(exc: Exception) -> bool:
    """An error of the database driver, SQLAlchemy or MLflow. Their modules are looked up, not
    imported: an exception can only be theirs if they were loaded, and importing MLflow to find
    out would cost a report of a SQLite store 1 s (it reads the tables with sqlite3 alone)."""
    import sqlite3

    kinds: list[type[BaseException]] = [sqlite3.Error]
    for module, name in (("sqlalchemy.exc", "SQLAlchemyError"), ("mlflow.exceptions", "MlflowException")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            kinds.append(getattr(loaded, name))
    return isinstance(exc, tuple(kinds))


def _analysis_stores(storage: str | None, tracking_uri: str | None) -> Any:
    """The stores a report or an export reads, checked first: URLs parsed, files there (a reader
    must not leave an empty database behind), a tracking server answering within seconds."""
    from batchscope.sweeps.store_setup import check_tracking, quiet_libraries, resolve

    quiet_libraries()
    stores = resolve(storage, tracking_uri, fields=("--storage", "--tracking-uri"), writing=False)
    if storage is None and not os.path.exists(stores.storage_url):
        raise UserError(
            f"no sweep has run here yet ({stores.storage_url} does not exist); "
            "run batchscope sweep CONFIG first, or give --storage"
        )
    if "://" not in stores.storage_url and not os.path.isfile(stores.storage_url):
        raise UserError(f"--storage {stores.storage_url!r}: no such file; give the journal of a sweep, or its URL")
    db = stores.tracking_uri.removeprefix("sqlite:///").partition("?")[0]
    if stores.tracking_uri.startswith("sqlite:///") and not os.path.isfile(db):
        raise UserError(
            f"no MLflow database at {db} (the sweep's runs are kept there); give --tracking-uri if they are elsewhere"
        )
    check_tracking(stores, create=False, field="--tracking-uri")
    if "://" not in stores.storage_url and os.path.isfile(stores.storage_url):
        from batchscope.sweeps.journal import settle_journal

        # analysis/ reads the journal with Optuna's own backend: set a torn tail aside, refuse corruption first.
        settle_journal(stores.storage_url)
    return stores


def _optuna_storage(stores: Any) -> Any:
    """A database or Redis storage opened as the sweep opens it (timeouts, one-line errors, Redis);
    a journal file is given to analysis/ by its path."""
    if "://" not in stores.storage_url:
        return stores.storage_url
    from batchscope.sweeps.store_setup import open_storage

    return open_storage(stores, heartbeat=False)


def _print_best(sweep: Any) -> None:
    study = sweep.study
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        out.print("[yellow]No trial completed[/]: see `batchscope status` for the reasons.")
        return
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    names = sweep.cfg.search.objectives
    for t in best[:5]:
        vals = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values, strict=True))
        point = f"batch_size={t.params['batch_size']}  lr={t.params['lr']:.4g}{extra_params(t.params)}"
        out.print(f"best: trial {t.number}  {point}  {vals}")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_store_urls(cfg)  # before AutoBatch's measurement and torch's import
    import math as _m

    from batchscope.sweeps.config_bounds import check_batch_size

    if args.batch_size is not None:  # its range and --lr's, --seed's are checked by the parser
        check_batch_size(cfg, args.batch_size, "--batch-size")
    bs = args.batch_size if args.batch_size is not None else cfg.train.batch_size
    max_micro = None
    if bs == "auto" or cfg.train.micro_batch_size == "auto":
        from batchscope.sweeps import memory

        fits = memory.measure(cfg, fraction=0.9)
        err.print(f"AutoBatch: {escape(fits.method)}")
        max_micro = int(fits.batch_size)
        if bs == "auto":
            bs = max_micro
    if bs is None:
        choices = cfg.search.batch_choices()
        bs = choices[len(choices) // 2]
    lr = args.lr
    if lr is None:
        lrs = cfg.search.lr_choices()
        lr = lrs[len(lrs) // 2] if lrs else _m.sqrt(cfg.search.lr.low * cfg.search.lr.high)  # type: ignore[union-attr]
    seed = cfg.train.seeds[0] if args.seed is None else args.seed
    from batchscope.sweeps.single import train_once

    result, run_id = train_once(cfg, int(bs), lr, seed, max_micro=max_micro)
    table = Table(title=f"{cfg.study}: batch_size={bs} lr={lr:.4g} seed={seed} → {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(result.final.items()):
        table.add_row(k, f"{v:.6g}")
    out.print(table)
    if result.reason:
        out.print(f"note: {escape(result.reason)}")
    out.print(f"MLflow run {run_id}: batchscope ui, then open http://127.0.0.1:5000")
    return 0 if result.status in ("ok", "pruned") else 1


def cmd_status(args: argparse.Namespace) -> int:
    import optuna

    from batchscope.sweeps.store_setup import open_storage, quiet_libraries, resolve

    quiet_libraries()
    stores = resolve(args.storage, None)
    if args.storage is None and not os.path.exists(stores.storage_url):
        raise UserError(
            f"no sweep has run here yet ({stores.storage_url} does not exist); start one with batchscope sweep CONFIG"
        )
    storage = open_storage(stores, heartbeat=False)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if args.study is None:
        table = Table(title=f"studies in {escape(stores.storage_label)}")
        for col in ("study", "trials", "directions"):
            table.add_column(col)
        for s in summaries:
            table.add_row(escape(s.study_name), str(s.n_trials), ", ".join(d.name.lower() for d in s.directions))
        out.print(table)
        return 0
    names = [s.study_name for s in summaries]
    if args.study not in names:
        raise UserError(
            f"no study named {args.study!r} in {stores.storage_label}; known studies: {', '.join(names) or 'none'}"
        )
    study = optuna.load_study(study_name=args.study, storage=storage)
    table = Table(title=f"study {escape(args.study)}")
    trials = study.get_trials(deepcopy=False)
    # search.params, in the order trials first had them.
    extra = list(dict.fromkeys(k for t in trials for k in t.params if k not in ("batch_size", "lr")))
    for col in ("#", "state", "status", "batch_size", "lr", *extra, "objective", "steps to target", "run id", "reason"):
        table.add_column(col, overflow="fold")
    for t in trials:
        vals = ", ".join(f"{v:.4g}" for v in t.values) if t.values else ""
        stt = t.user_attrs.get("steps_to_target")
        table.add_row(
            str(t.number),
            t.state.name,
            escape(str(t.user_attrs.get(attrs.STATUS, ""))),
            str(t.params.get("batch_size", "")),
            f"{t.params['lr']:.4g}" if "lr" in t.params else "",
            *(escape(param_text(t.params[k])) if k in t.params else "" for k in extra),
            vals,
            "" if stt is None or not math.isfinite(stt) else f"{stt:.0f}",
            escape(str(t.user_attrs.get(attrs.MLFLOW_RUN_ID, ""))),
            escape(str(t.user_attrs.get(attrs.REASON, ""))[:80]),
        )
    out.print(table)
    return 0


def _quote(name: str) -> str:
    import shlex

    return shlex.quote(name)
