"""optuna-dashboard on a batchscope study storage: `batchscope ui --optuna`.

Started through optuna-dashboard's public Python entry point, `optuna_dashboard.run_server`,
with the storage object batchscope itself opens: the local journal then goes through the same
lock type every batchscope process uses (`stores.journal_storage`), which the dashboard's own
command line would not (it picks its own lock for a file path), and a PostgreSQL or Redis URL
is opened with the same driver checks and one-line errors as a sweep. (`python -m
optuna_dashboard`, used before, has no `__main__` in current optuna-dashboard and exited 1.)

Run as a module so that `batchscope ui` can stop it with Ctrl-C like the MLflow UI:
`python -m batchscope.sweeps.dashboard STORAGE --host H --port P`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from batchscope.sweeps.errors import UserError

INSTALL_HINT = "optuna-dashboard is not installed: pip install 'batchscope[dashboard]'"


def check_installed() -> None:
    """Refuse in one line, before anything starts, when the dashboard is missing."""
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UserError(INSTALL_HINT)


def serve(storage_url: str, host: str, port: int) -> None:
    """Serve the dashboard on `host:port` until interrupted."""
    import optuna_dashboard

    from batchscope.sweeps.store_setup import Stores, open_storage

    # Reading and annotating only: no heartbeat (that belongs to a worker running trials).
    storage = open_storage(Stores(storage_url, "", None, None), heartbeat=False)
    optuna_dashboard.run_server(storage, host=host, port=port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchscope.sweeps.dashboard")
    parser.add_argument("storage")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        check_installed()
        serve(args.storage, args.host, args.port)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
