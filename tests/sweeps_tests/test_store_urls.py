"""Store URLs and output folders, as a user meets them: a bad one is refused in one line (exit 2,
no traceback, no password) before anything is written, and a server that is down or silent is
reported within seconds, not after MLflow's or libpq's minutes of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchscope.sweeps.cli import main
from batchscope.sweeps.locations import check_storage, check_tracking_uri
from tests.conftest import small_config, write_config

SECRETS = ("Unenc0ded", "Xq7Part", "R3disPw", "PgUs3rPw", "QueryPw9")  # planted below; shown nowhere
LOOSE_S = 30  # a loose bound: the point is "seconds, not minutes"

CFG, JOURNAL = "{cfg}", "{journal}"  # placeholders: the config, and an (empty) journal, in the test's folder


def _sweep(key: str, value: str) -> list[str]:
    return ["sweep", CFG, "--no-report", "--set", f"{key}={value}"]


# (id, command line, fragments the one line must contain)
CASES = [
    ("postgresql alone", _sweep("storage", "postgresql://"), ["storage 'postgresql://'", "names no database"]),
    ("postgresql no db", _sweep("storage", "postgresql://postgres@127.0.0.1:5432"), ["storage", "no database"]),
    ("bad port", _sweep("storage", "postgresql://postgres@127.0.0.1:port/db"), ["storage", "port 'port'"]),
    ("unknown scheme", _sweep("storage", "ftp://x"), ["storage 'ftp://x'", "unsupported scheme"]),
    ("sqlite in memory", _sweep("storage", "sqlite://"), ["storage", "in-memory"]),
    ("sqlite under /proc", _sweep("storage", "sqlite:////proc/bs/optuna.db"), ["storage", "/proc"]),
    ("journal under /sys", _sweep("storage", "/sys/bs/optuna.journal"), ["storage", "/sys"]),
    ("journal below a file", _sweep("storage", f"{CFG}/optuna.journal"), ["storage", "is a file, not a folder"]),
    ("redis without host", _sweep("storage", "redis://"), ["storage", "no host"]),
    ("scheme without //", _sweep("storage", "postgresql:127.0.0.1/db"), ["storage", "malformed"]),
    (
        "password with unencoded @",
        _sweep("storage", "postgresql://postgres:Unenc0ded@Xq7Part@127.0.0.1:5432/db"),
        ["storage", "postgres:***@127.0.0.1", "%40"],
    ),
    ("tracking not a uri", _sweep("tracking_uri", "not a uri"), ["tracking_uri 'not a uri'", "is not a tracking URI"]),
    ("tracking ftp", _sweep("tracking_uri", "ftp://x"), ["tracking_uri 'ftp://x'", "unsupported scheme"]),
    ("tracking http no host", _sweep("tracking_uri", "http://"), ["tracking_uri", "no host"]),
    ("tracking file store", _sweep("tracking_uri", "file:./mlruns"), ["tracking_uri", "sqlite:///"]),
    ("tracking under /proc", _sweep("tracking_uri", "sqlite:////proc/bs/mlflow.db"), ["tracking_uri", "/proc"]),
    ("worker", ["worker", CFG, "--storage", "postgresql://"], ["storage", "no database"]),
    ("train", ["train", CFG, "--set", "tracking_uri=not a uri"], ["tracking_uri", "not a tracking URI"]),
    ("status", ["status", "--storage", "postgresql://"], ["storage", "no database"]),
    ("report tracking", ["report", "s", "--tracking-uri", "ftp://x"], ["--tracking-uri 'ftp://x'", "unsupported"]),
    ("export tracking", ["export", "s", "--tracking-uri", "not a uri"], ["--tracking-uri", "not a tracking URI"]),
    ("export storage", ["export", "s", "--storage", "postgresql://"], ["--storage 'postgresql://'", "no database"]),
    ("ui", ["ui", "--tracking-uri", "ftp://x"], ["tracking_uri", "unsupported scheme"]),
    ("export onto a file", ["export", "s", "--out", CFG], ["--out", "is a file, not a folder"]),
    ("export under /proc", ["export", "s", "--out", "/proc/bs"], ["--out '/proc/bs'", "/proc"]),
    ("export below a file", ["export", "s", "--out", f"{CFG}/sub"], ["--out", "is a file, not a folder"]),
    ("report onto a file", ["report", "s", "--out", CFG], ["--out", "is a file, not a folder"]),
    ("export, MLflow db missing", ["export", "s", "--storage", JOURNAL], ["no MLflow database", "mlflow.db"]),
    ("export, journal missing", ["export", "s", "--storage", "nope.journal"], ["--storage 'nope.journal'", "no such"]),
]


@pytest.fixture
def folder(workdir: Path) -> Iterator[Path]:
    """The test's folder with a config and an empty journal in it (and no stores)."""
    write_config(workdir / "c.yaml", small_config("s"))
    (workdir / "old.journal").touch()
    yield workdir


def _argv(argv: list[str], folder: Path) -> list[str]:
    return [a.replace(CFG, str(folder / "c.yaml")).replace(JOURNAL, str(folder / "old.journal")) for a in argv]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _assert_refused(code: int, out: str, err: str, fragments: list[str]) -> None:
    """What the user sees: exit 2, one line on stderr naming the field, nothing else, no secret."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Warning" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert out.strip() == "", out
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    for secret in SECRETS:
        assert secret not in out + err, (secret, err)


@pytest.mark.parametrize(("name", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_location_is_one_line_and_creates_nothing(
    folder: Path, capsys: pytest.CaptureFixture[str], name: str, argv: list[str], fragments: list[str]
) -> None:
    before = _files(folder)
    started = time.monotonic()
    code = main(_argv(argv, folder))
    captured = capsys.readouterr()
    _assert_refused(code, captured.out, captured.err, fragments)
    assert time.monotonic() - started < LOOSE_S
    assert _files(folder) == before  # no mlruns/, no report or export folder, no database file


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", CFG, "--no-report", "--workers", "8", "--set", "tracking_uri=ftp://x"],
        ["worker", CFG, "--workers", "8", "--storage", "postgresql://"],
        ["train", CFG, "--set", "storage=sqlite:////proc/bs/optuna.db"],
    ],
    ids=["sweep", "worker", "train"],
)
def test_bad_url_is_refused_before_workers_and_torch(folder: Path, argv: list[str]) -> None:
    """A mistyped URL cost 29 s with --workers 8 (eight torch processes started, then stopped)
    and 6-9 s with one: the form of the config's URLs is checked before the trial workers and
    torch are loaded (in a fresh process, so that what it imported can be seen)."""
    probe = (
        "import sys; from batchscope.sweeps.cli import main; code = main(sys.argv[1:]); "
        "print(sorted({'torch', 'batchscope.sweeps.worker'} & set(sys.modules))); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *_argv(argv, folder)], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout.strip() == "[]", done.stdout  # neither was imported, so no worker was started


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
@pytest.mark.parametrize(
    ("argv", "field"),
    [(_sweep("storage", "{ro}/sub/optuna.journal"), "storage"), (["export", "s", "--out", "{ro}/out"], "--out")],
)
def test_unwritable_folder_is_refused(
    folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    ro = folder / "ro"
    ro.mkdir(mode=0o555)
    before = _files(folder)
    code = main([a.replace("{ro}", str(ro)) for a in _argv(argv, folder)])
    captured = capsys.readouterr()
    _assert_refused(code, captured.out, captured.err, [field, "not writable"])
    assert _files(folder) == before


def _cli(folder: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`batchscope ARGV` as a real process (warnings and all), and how long it took."""
    env = {**os.environ, "BATCHSCOPE_ROOT": str(folder / "mlruns"), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "batchscope.sweeps.cli", *_argv(list(argv), folder)],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=120,
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            ["status", "--storage", "redis://:R3disPw@127.0.0.1:1"],
            ["storage 'redis://:***@127.0.0.1:1' cannot be reached", "refused"],
        ),
        (
            ["status", "--storage", "postgresql://postgres:PgUs3rPw@127.0.0.1:1/x?password=QueryPw9"],
            ["storage 'postgresql://postgres:***@127.0.0.1:1/x?password=***' cannot be reached", "refused"],
        ),
        (
            ["status", "--storage", "postgresql://postgres:PgUs3rPw@127.0.0.1:5432/bs_no_such_database"],
            ['database "bs_no_such_database" does not exist'],
        ),
        (
            ["report", "s", "--storage", JOURNAL, "--tracking-uri", "http://u:PgUs3rPw@127.0.0.1:1"],
            ["--tracking-uri 'http://u:***@127.0.0.1:1' cannot be reached", "refused"],
        ),
    ],
    ids=["redis down", "postgresql down", "postgresql no database", "tracking server down"],
)
def test_server_down_is_one_clean_line(folder: Path, argv: list[str], fragments: list[str]) -> None:
    # A real process: Optuna's warnings and SQLAlchemy's "(Background on this error ...)" would show here.
    before = _files(folder)
    proc, took = _cli(folder, *argv)
    _assert_refused(proc.returncode, proc.stdout, proc.stderr, fragments)
    assert "(Background" not in proc.stderr and "(None)" not in proc.stderr, proc.stderr
    assert took < LOOSE_S, took
    assert _files(folder) == before


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung server (or a firewall that
    lets the handshake through), the case that waits forever without a timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["status", "--storage", "postgresql://postgres@127.0.0.1:{port}/x"], ["storage", "timeout"]),
        (["status", "--storage", "redis://127.0.0.1:{port}"], ["storage", "Timeout"]),
        (["export", "s", "--storage", JOURNAL, "--tracking-uri", "http://127.0.0.1:{port}"], ["--tracking-uri"]),
    ],
    ids=["postgresql", "redis", "tracking server"],
)
def test_silent_server_fails_within_seconds(
    folder: Path, silent_port: int, argv: list[str], fragments: list[str]
) -> None:
    before = _files(folder)
    proc, took = _cli(folder, *(a.replace("{port}", str(silent_port)) for a in argv))
    _assert_refused(proc.returncode, proc.stdout, proc.stderr, [*fragments, "cannot be reached"])
    assert took < LOOSE_S, took  # 5 s of timeout (and no retries) plus the start-up
    assert _files(folder) == before


@pytest.mark.parametrize(
    ("check", "url", "as_used"),
    [
        (check_storage, "postgresql+psycopg://u:p%40w@db.example:5432/optuna", None),
        (check_storage, "postgresql:///optuna", None),  # the local socket
        (check_storage, "postgres://u@h/optuna", "postgresql://u@h/optuna"),  # SQLAlchemy knows only the long name
        (check_storage, "mysql+pymysql://u:pw@h/optuna?charset=utf8mb4", None),
        (check_storage, "redis://:pw@h:6379/3", None),
        (check_storage, "rediss://h", None),
        (check_storage, "sqlite:///mlruns/optuna.db", None),
        (check_storage, "mlruns/optuna.journal", None),
        (check_tracking_uri, "http://u:p@mlflow.example:5000/prefix", None),
        (check_tracking_uri, "https://mlflow.example", None),
        (check_tracking_uri, "postgresql://u@h/mlflow", None),
        (check_tracking_uri, "sqlite:////tmp/mlflow.db", None),
    ],
)
def test_good_urls_pass(workdir: Path, check: Callable[[str], str], url: str, as_used: str | None) -> None:
    # Nothing a driver accepts is refused; nothing is touched by the check.
    assert check(url) == (as_used or url)
    assert list(workdir.iterdir()) == []
