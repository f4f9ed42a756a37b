"""Credentials never leak; unreachable stores are one clear line; names cannot escape their folder."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from batchscope.analysis.paths import safe_name
from batchscope.sweeps.cli import main
from batchscope.sweeps.locations import redact
from batchscope.sweeps.store_setup import driver_error
from tests.conftest import small_config, write_config

SECRET = "Pl4ntedS3cretXYZ"
# One marker per credential form; each must appear nowhere once planted in a store URL.
USERINFO_PW = f"{SECRET}%40Xq9Tail"  # user:password@, with a percent-encoded '@' (decoded: ...@Xq9Tail)
QUERY_PW = "Qu3ryPwZk4"  # ?password=
REDIS_PW = "R3disPwVb8"  # redis://:password@
MARKERS = (SECRET, "Xq9Tail", QUERY_PW, REDIS_PW)


def _assert_hidden(text: str | bytes, where: object) -> None:
    for marker in MARKERS:
        found = marker.encode() in text if isinstance(text, bytes) else marker in text
        assert not found, (marker, where)


def _assert_nowhere_local(workdir: Path, config: Path, study: str, url: str) -> None:
    """Not in MLflow's params and tags (the sweep run's `storage` is the masked URL), nor in any file
    written under the working directory: stores, artifacts, checkpoints, reports, exports."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    for run in runs:
        _assert_hidden(repr(run.data.params) + repr(run.data.tags), run.info.run_id)
    sweep_runs = [r for r in runs if r.data.tags.get("batchscope.role") == "sweep"]
    assert [r.data.params["storage"] for r in sweep_runs] == [redact(url)]
    assert "***" in redact(url)
    for f in workdir.rglob("*"):
        if f.is_file() and f != config:
            _assert_hidden(f.read_bytes(), f)


def test_planted_password_appears_nowhere(workdir: Path, pg_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Trust auth accepts any password, so a real sweep runs against PostgreSQL with planted ones:
    # in the user info (percent-encoded) and as a ?password= parameter.
    url = f"postgresql://postgres:{USERINFO_PW}@127.0.0.1:5432/{pg_database}?password={QUERY_PW}&application_name=bs"
    cfg = small_config("leak")
    cfg["train"]["max_steps"] = 20
    cfg["search"]["n_trials"] = 2
    cfg["storage"] = url
    path = write_config(workdir / "leak.yaml", cfg)
    assert main(["sweep", str(path)]) == 0  # with its report
    assert main(["status", "leak", "--storage", url]) == 0
    assert main(["export", "leak", "--storage", url, "--out", str(workdir / "export")]) == 0
    # An error that involves the URL does not show the password either.
    assert main(["status", "nope", "--storage", url]) == 2
    out = capsys.readouterr()
    _assert_hidden(out.out + out.err, "output")
    assert "***" in out.out + out.err  # the URL is shown redacted
    assert list((workdir / "reports").rglob("*.html")) and list((workdir / "export").glob("*.csv"))
    _assert_nowhere_local(workdir, path, "leak", url)
    # Every table of the Optuna storage in PostgreSQL.
    conn = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{pg_database}")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        tables = [row[0] for row in cur.fetchall()]
        assert "trial_user_attributes" in tables
        for table in tables:
            cur.execute(f'SELECT * FROM "{table}"')
            _assert_hidden(repr(cur.fetchall()), table)
    conn.close()


def test_planted_password_in_the_tracking_uri_appears_in_no_file(
    workdir: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # MLflow's runs on PostgreSQL with a planted password: the report folder (its cache record of
    # where it was logged once kept the URI whole), the journal and every other file stay clean.
    url = f"postgresql://postgres:{USERINFO_PW}@127.0.0.1:5432/{pg_database}"
    cfg = small_config("leak-tracking")
    cfg["train"]["max_steps"] = 20
    cfg["search"]["n_trials"] = 1
    cfg["tracking_uri"] = url
    path = write_config(workdir / "leak.yaml", cfg)
    assert main(["sweep", str(path)]) == 0  # with its report, logged to the parent run
    assert main(["report", "leak-tracking", "--tracking-uri", url]) == 0  # unchanged: the cached one
    out = capsys.readouterr()
    _assert_hidden(out.out + out.err, "output")
    assert list((workdir / "reports").rglob("index.html"))
    for f in workdir.rglob("*"):
        if f.is_file() and f != path:
            _assert_hidden(f.read_bytes(), f)


@pytest.fixture
def redis_db() -> Iterator[int]:
    """An empty Redis database on the local server (numbers 8-15 are tried), emptied afterwards."""
    redis = pytest.importorskip("redis")
    try:
        client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=3)
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not running on 127.0.0.1:6379: {exc}")
    for number in random.sample(range(8, 16), 8):
        db = redis.Redis(host="127.0.0.1", port=6379, db=number)
        if db.dbsize() == 0:
            break
    else:
        pytest.skip("no empty Redis database among 8-15")
    try:
        yield number
    finally:
        db.flushdb()


def test_planted_redis_password_appears_nowhere(
    workdir: Path, redis_db: int, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    url = f"redis://:{REDIS_PW}@127.0.0.1:6379/{redis_db}"
    cfg = small_config("leak-redis")
    cfg["train"]["max_steps"] = 20
    cfg["search"]["n_trials"] = 1
    cfg["storage"] = url
    path = write_config(workdir / "leak.yaml", cfg)
    assert main(["sweep", str(path), "--no-report"]) == 0
    assert main(["status", "leak-redis", "--storage", url]) == 0
    assert main(["export", "leak-redis", "--storage", url, "--out", str(workdir / "export")]) == 0
    assert main(["status", "nope", "--storage", url]) == 2
    out = capsys.readouterr()
    _assert_hidden(out.out + out.err, "output")
    assert f"redis://:***@127.0.0.1:6379/{redis_db}" in out.out + out.err
    _assert_nowhere_local(workdir, path, "leak-redis", url)
    # The Optuna journal in Redis: every key and value.
    db = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
    keys = list(db.scan_iter())
    assert keys
    for key in keys:
        _assert_hidden(key + (db.get(key) or b""), key)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("storage", f"postgresql://postgres:{SECRET}@127.0.0.1:1/none", "storage"),
        ("tracking_uri", "http://127.0.0.1:1", "tracking_uri"),
        ("storage", "mongodb://127.0.0.1/x", "unsupported scheme"),
    ],
)
def test_unreachable_store_is_one_line_and_creates_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, fragment: str
) -> None:
    path = write_config(workdir / "c.yaml", small_config("unreachable"))
    code = main(["sweep", str(path), "--no-report", "--set", f"{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1, err
    assert SECRET not in err
    assert not (workdir / "mlruns").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p%40ss@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+psycopg2://user:pw@host/db", "postgresql+psycopg2://user:***@host/db"),
        ("http://alice:secret@mlflow:5000", "http://alice:***@mlflow:5000"),
        ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        # Redis: a password with no user name.
        ("redis://:pw@127.0.0.1:6379/2", "redis://:***@127.0.0.1:6379/2"),
        # An unencoded '@' (or '/', '?', a space) in the password: masked up to the last '@'.
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p/s?s w@h/db", "postgresql://u:***@h/db"),
        # Secrets as parameters, whatever their case.
        ("postgresql://h/db?password=pw&sslmode=require", "postgresql://h/db?password=***&sslmode=require"),
        ("postgresql://h/db?sslmode=require&PASSWORD=p%40w", "postgresql://h/db?sslmode=require&PASSWORD=***"),
        ("http://h:5000/?token=t0k&x=1", "http://h:5000/?token=***&x=1"),
        ("s3://b/k?X-Amz-Credential=c&X-Amz-Signature=s", "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        # A token as the user name of an http URL; a plain user name elsewhere is kept.
        ("https://ghp_t0k@mlflow.example", "https://***@mlflow.example"),
        ("postgresql://postgres@h/db", "postgresql://postgres@h/db"),
        # '@' in a path or a parameter is not a credential.
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
        ("postgresql://h/db?options=a@b", "postgresql://h/db?options=a@b"),
        # URLs inside a message (a driver's error), and a libpq DSN.
        ("storage 'postgresql://u:pw@h/db' failed for x@y", "storage 'postgresql://u:***@h/db' failed for x@y"),
        ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "x<script>alert(1)</script>", "/abs", ""])
def test_study_names_cannot_escape_their_folder(tmp_path: Path, name: str) -> None:
    safe = safe_name(name)
    assert "/" not in safe and safe not in ("", ".", "..")
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()


def test_driver_error_is_one_line_without_secrets() -> None:
    # A driver may echo a password outside any URL, percent-decoded; SQLAlchemy adds its class and a link.
    url = "postgresql://u:S3cr%2Ft@h/db?password=Qx9zW"
    exc = RuntimeError(
        "(psycopg.OperationalError) auth failed for S3cr/t and Qx9zW\n"
        "(Background on this error at: https://sqlalche.me/e/20/e3q8)"
    )
    assert driver_error(exc, url) == "auth failed for *** and ***"
