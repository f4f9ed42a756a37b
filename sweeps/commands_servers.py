"""The commands that start a server and wait for it: `server` (an MLflow tracking server) and `ui`
(the MLflow UI, or optuna-dashboard, on the sweep's stores)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from rich.markup import escape

from batchscope.sweeps.commands import err, out
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.locations import redact


def cmd_server(args: argparse.Namespace) -> int:
    from batchscope.sweeps.store_setup import Stores, check_tracking

    if args.check is not None:
        check_tracking(Stores("", args.check, None, None), create=False)
        out.print(f"MLflow tracking server at {escape(redact(args.check))} answers.")
        return 0
    if args.backend_store_uri is None:
        raise UserError("give --backend-store-uri (e.g. postgresql://mlflow@db/mlflow), or --check URL")
    _check_database(args.backend_store_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        args.artifacts_destination,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.host not in ("127.0.0.1", "localhost"):
        cmd += ["--allowed-hosts", "*"]
    uri = f"http://{args.host}:{args.port}"
    err.print(f"MLflow tracking server on {uri} (backend {escape(redact(args.backend_store_uri))}); Ctrl-C to stop")
    err.print(f"Use it with: --set tracking_uri={uri}   (or tracking_uri: {uri} in the config)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def _check_database(url: str) -> None:
    """Connect once, so a wrong URL is one clear line rather than a server that dies later."""
    if not url.startswith(("postgresql", "mysql", "sqlite")):
        raise UserError(f"--backend-store-uri {url!r}: use a postgresql://, mysql:// or sqlite:/// URL")
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--backend-store-uri {redact(url)!r} cannot be reached: {redact(first)}") from None


def cmd_ui(args: argparse.Namespace) -> int:
    from batchscope.sweeps.store_setup import resolve

    stores = resolve(args.storage, args.tracking_uri)
    if args.optuna:
        from batchscope.sweeps import dashboard

        dashboard.check_installed()
        port = args.port or 8080
        cmd = [sys.executable, "-m", "batchscope.sweeps.dashboard", stores.storage_url, "--host", args.host]
        cmd += ["--port", str(port)]
        err.print(f"optuna-dashboard on http://{args.host}:{port} (Ctrl-C to stop)")
    else:
        port = args.port or 5000
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            stores.tracking_uri,
            "--host",
            args.host,
            "--port",
            str(port),
        ]
        if stores.artifact_root:
            cmd += ["--default-artifact-root", stores.artifact_root]
        err.print(f"MLflow UI on http://{args.host}:{port} (Ctrl-C to stop)")
    return _serve(cmd)


def _serve(cmd: list[str]) -> int:
    """Run a UI server until it ends or batchscope is stopped, and then stop it too.

    Ctrl-C in a terminal reaches both processes, but a SIGTERM from a job system, or a SIGINT
    sent to batchscope alone, left the server running and holding its port.
    """
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt as exc:  # SIGTERM arrives as Terminated, a KeyboardInterrupt
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if type(exc) is not KeyboardInterrupt:
            raise
        return 0
