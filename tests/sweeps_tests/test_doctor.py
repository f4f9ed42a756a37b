"""`batchscope doctor` on a real finished study: what it finds, what --repair fixes, and that the
same sweep command then resumes the study with the tracking contract intact."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities.view_type import ViewType
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import check_tracking, journal_storage, resolve
from batchscope.sweeps.tracking import REASON, ROLE, STATUS, STUDY, TRIAL, WORKER, Tracker
from tests.conftest import small_config, write_config

NAME = "doc"
DEAD_WORKER = f"{socket.gethostname()}:999999999"  # a process that does not exist


def _config() -> dict:
    cfg = small_config(NAME)
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["n_trials"] = 3
    return cfg


def _env(base: Path) -> dict[str, str]:
    return dict(os.environ, BATCHSCOPE_ROOT=str(base / "mlruns"), PYTHONUNBUFFERED="1")


def _sweep(base: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchscope.sweeps.cli", "sweep", "study.yaml", "--no-report", *extra],
        cwd=base,
        env=_env(base),
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real finished study of 3 trials, copied by each test."""
    base = tmp_path_factory.mktemp("finished")
    write_config(base / "study.yaml", _config())
    proc = _sweep(base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


@pytest.fixture
def copy(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished study, whose stores are this test's default ones."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(tmp_path / "mlruns"))
    return tmp_path


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _journal(base: Path) -> Path:
    return base / "mlruns" / "optuna.journal"


def _client(base: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{base / 'mlruns' / 'mlflow.db'}")


def _trials(journal: Path) -> list[tuple]:
    """Number, state, params and values of each trial, as Optuna's own backend replays them."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return [
        (t.number, t.state.name, t.params, t.values) for t in optuna.load_study(study_name=NAME, storage=storage).trials
    ]


def _corrupt_line(journal: Path, index: int, at: int | None = None) -> int:
    """One byte of line `index` (0-based) made invalid (its middle one, or byte `at`); returns its
    1-based line number."""
    lines = journal.read_bytes().splitlines(keepends=True)
    bad = bytearray(lines[index])
    bad[len(bad) // 2 if at is None else at] = 0xFF
    journal.write_bytes(b"".join([*lines[:index], bytes(bad), *lines[index + 1 :]]))
    return index + 1


def _line_index(journal: Path, op_code: int, nth: int = 0) -> int:
    starts = [
        i for i, line in enumerate(journal.read_bytes().splitlines()) if line.startswith(b'{"op_code":%d,' % op_code)
    ]
    return starts[nth]


def _killed_mid_trial(base: Path) -> tuple[int, str]:
    """What a sweep killed mid-trial leaves: a RUNNING trial whose worker is gone, with a RUNNING run
    that the trial does not list yet (killed between creating the run and recording it)."""
    from batchscope.sweeps.config_load import validate
    from batchscope.sweeps.space import make_sampler

    # Sampled as the sweep samples (its batch sizes only: an int axis holds every integer between them).
    sampler = make_sampler(validate(_config(), "test").search, 0)
    study = optuna.load_study(study_name=NAME, storage=journal_storage(_journal(base)), sampler=sampler)
    trial = study.ask(fixed_distributions=study.trials[0].distributions)
    trial.set_user_attr("worker", DEAD_WORKER)
    tracker = Tracker(f"sqlite:///{base / 'mlruns' / 'mlflow.db'}")
    exp_id = tracker.experiment_id(NAME)
    parent = tracker.client.search_runs([exp_id], filter_string=f"tags.`{ROLE}` = 'sweep'")[0].info.run_id
    tags = {STUDY: NAME, TRIAL: str(trial.number), STATUS: "running"}
    return trial.number, tracker.trial_run(exp_id, parent, f"trial {trial.number}", trial.params, tags)


def test_a_healthy_study_is_healthy(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, said = _doctor(capsys)
    assert code == 0 and "Healthy." in said, said
    assert "one to one" in said and not (copy / "mlruns" / "backups").exists()


def test_repair_brings_back_a_corrupt_study_and_the_same_sweep_resumes_it(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = _journal(copy)
    number, orphan_run = _killed_mid_trial(copy)
    before = [t for t in _trials(journal) if t[0] != number]  # the uncorrupted copy's trials
    # An intermediate value in the middle: losing it loses nothing a trial list shows.
    line = _corrupt_line(journal, _line_index(journal, op_code=7, nth=2))
    corrupted = journal.read_bytes()

    code, said = _doctor(capsys, NAME)
    assert code == 1, said
    assert f"line(s) {line} corrupt" in said and f"trial {number} is RUNNING" in said, said
    assert journal.read_bytes() == corrupted, "without --repair nothing changes"

    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    assert "Traceback" not in said
    # Backed up first, the bad line set aside, every complete trial kept.
    (backup,) = (copy / "mlruns" / "backups").iterdir()
    assert (backup / "optuna.journal").read_bytes() == corrupted and (backup / "mlflow.db").is_file()
    (sidecar,) = journal.parent.glob("optuna.journal.corrupt-*")
    assert sidecar.read_bytes() == corrupted.splitlines(keepends=True)[line - 1]
    trials = _trials(journal)
    assert [t for t in trials if t[0] in {b[0] for b in before}] == before
    # The dead trial failed, linked to its run by its tags, its run closed, and queued again.
    study = optuna.load_study(study_name=NAME, storage=journal_storage(journal))
    dead = study.trials[number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["mlflow_run_id"] == orphan_run
    assert _client(copy).get_run(orphan_run).info.status == "KILLED"
    assert [t.user_attrs.get("retry_of") for t in study.trials if t.state == TrialState.WAITING] == [number]
    code, said = _doctor(capsys)
    assert code == 0, said

    # The same sweep command continues the study to n_trials, with the contract intact.
    proc = _sweep(copy, "--n-trials", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name=NAME, storage=journal_storage(journal))
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    runs = _client(copy).search_runs([_client(copy).get_experiment_by_name(NAME).experiment_id], max_results=1000)
    assert all(r.info.status != "RUNNING" for r in runs)
    children = [r for r in runs if r.data.tags.get(ROLE) == "trial"]
    by_number = {int(r.data.tags[TRIAL]): r.info.run_id for r in children}
    assert len(by_number) == len(children) == len(study.trials)
    assert {t.number: t.user_attrs["mlflow_run_id"] for t in study.trials} == by_number


def test_a_damaged_trial_creation_is_rebuilt_and_every_trial_kept(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial's creation with a bad byte in its middle still says which study it belongs to: it is
    rebuilt from what is legible, so no later trial shifts id and every trial is kept (found by a
    hostile-user check: trials 1–3 of a 4-trial study were given up)."""
    journal = _journal(copy)
    before = _trials(journal)
    index = _line_index(journal, op_code=4, nth=1)  # trial 1's creation
    corrupted_line = _corrupt_line(journal, index)
    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    assert "Traceback" not in said and "records before line" not in said, said
    assert _trials(journal) == before  # numbers, states, params and values of every trial
    (sidecar,) = journal.parent.glob("optuna.journal.corrupt-*")
    assert sidecar.read_bytes().count(b"\n") == 1 and corrupted_line
    code, said = _doctor(capsys)
    assert code == 0, said
    proc = _sweep(copy, "--n-trials", str(len(before) + 1))  # the same command goes on
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_trials(journal)) == len(before) + 1


def test_a_lost_trial_creation_keeps_the_records_before_it_and_retires_its_run(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A creation whose op code itself is unreadable cannot be rebuilt, and dropping it would shift
    every later trial onto the wrong id: only the records before it are kept (the rest go to the
    sidecar), and the run of the trial lost is set aside."""
    journal = _journal(copy)
    before = _trials(journal)
    # trial 2's creation, its op code's digit: `{"op_code":4,` → byte 11
    line = _corrupt_line(journal, _line_index(journal, op_code=4, nth=2), at=11)
    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    assert f"records before line {line}" in said, said
    assert _trials(journal) == before[:2]
    client = _client(copy)
    every = client.search_runs([client.get_experiment_by_name(NAME).experiment_id], run_view_type=ViewType.ALL)
    lost = [r for r in every if r.data.tags.get(TRIAL) == "2"]
    assert [r.info.lifecycle_stage for r in lost] == ["deleted"]  # restorable, and no longer one of the study's
    code, said = _doctor(capsys)
    assert code == 0, said


def test_a_run_left_running_after_its_trial_ended_is_closed(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client = _client(copy)
    run_id = (
        _client(copy)
        .search_runs([client.get_experiment_by_name(NAME).experiment_id], filter_string=f"tags.`{TRIAL}` = '1'")[0]
        .info.run_id
    )
    client.update_run(run_id, status="RUNNING")  # as a process killed between its trial and its run's end
    code, said = _doctor(capsys)
    assert code == 1 and f"run {run_id} of trial 1 is RUNNING, but its trial is COMPLETE" in said, said
    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "batchscope doctor" in run.data.tags["batchscope.reason"]


def test_a_study_emptied_from_the_journal_is_reported(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _journal(copy).write_bytes(b"")
    code, said = _doctor(capsys)
    assert code == 1 and "has no such study" in said, said


def test_nothing_to_check_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(tmp_path / "mlruns"))
    code, said = _doctor(capsys)
    assert code == 2 and len(said.strip().splitlines()) == 1 and "nothing to check" in said, said
    code, said = _doctor(capsys, "--repair")
    assert code == 2 and not (tmp_path / "mlruns").exists()


def test_a_damaged_mlflow_database_is_reported(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = copy / "mlruns" / "mlflow.db"
    data = bytearray(db.read_bytes())
    page = 4096
    data[3 * page : 4 * page] = b"\xa5" * page  # one page of the file overwritten
    db.write_bytes(bytes(data))
    code, said = _doctor(capsys)
    assert code == 1 and "mlflow.db" in said and "Traceback" not in said, said
    assert "cannot be repaired safely" in said
    assert db.read_bytes() == bytes(data), "a damaged database is left as it is"


def test_a_half_built_mlflow_database_without_runs_is_moved_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a disk that filled during MLflow's first migrations leaves: some tables, no runs."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(tmp_path / "mlruns"))
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE registered_models (name VARCHAR(256) PRIMARY KEY)")
    conn.close()
    code, said = _doctor(capsys)
    assert code == 1 and "not a whole MLflow store" in said, said
    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    (backup,) = (tmp_path / "mlruns" / "backups").iterdir()
    assert not db.exists() and (backup / "mlflow.db").is_file()


# ---- `batchscope train` runs -------------------------------------------------------------

# The process a train run names → what doctor says about it while it is RUNNING.
TRAIN_WORKERS = [
    pytest.param(DEAD_WORKER, "problem", id="gone"),  # this host, no such process: closed by --repair
    pytest.param(f"{socket.gethostname()}:{os.getpid()}", None, id="alive"),  # this test's own process
    pytest.param("another-host:1", None, id="another-host"),  # another host's process is trusted
    pytest.param(None, "note", id="untagged"),  # made by an older batchscope: said, never closed
]


@pytest.mark.parametrize(("worker", "level"), TRAIN_WORKERS)
def test_a_train_run_left_running_is_closed_only_when_its_process_is_gone(
    copy: Path, capsys: pytest.CaptureFixture[str], worker: str | None, level: str | None
) -> None:
    client = _client(copy)
    tags = {ROLE: "train"} | ({WORKER: worker} if worker else {})
    run_id = client.create_run(client.get_experiment_by_name(NAME).experiment_id, tags=tags).info.run_id
    code, said = _doctor(capsys)
    assert code == (1 if level == "problem" else 0), said
    assert (f"train run {run_id} is RUNNING" in said) == (level is not None), said
    if level == "note":
        assert "names no process" in said, said
    code, said = _doctor(capsys, "--repair")
    assert code == 0, said
    run = client.get_run(run_id)
    if level == "problem":
        assert run.info.status == "KILLED" and "batchscope doctor" in run.data.tags[REASON]
        assert run.data.tags[STATUS] == "failed"
    else:
        assert run.info.status == "RUNNING" and REASON not in run.data.tags


def test_a_killed_batchscope_train_leaves_a_run_that_doctor_closes(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kill -9` of `batchscope train` leaves its run RUNNING for good: doctor says so, --repair closes it."""
    cfg = small_config("killed-train")
    cfg["train"].update({"max_steps": 20000, "eval_every": 1000, "sharpness": {"enabled": False}})
    write_config(workdir / "train.yaml", cfg)
    # The store made first: polling it while `train` runs MLflow's migrations would race them.
    stores = resolve(None, None)
    check_tracking(stores)
    client = MlflowClient(stores.tracking_uri)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchscope.sweeps.cli", "train", "train.yaml"],
        cwd=workdir,
        env=_env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = _running_train_run(client, "killed-train", proc)
        assert run.data.tags[WORKER] == f"{socket.gethostname()}:{proc.pid}"
        proc.kill()  # SIGKILL: nothing in the process gets to end its run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"

    code, said = _doctor(capsys)
    assert code == 1, said
    assert f"train run {run_id} is RUNNING, but its process {socket.gethostname()}:{proc.pid} is not" in said, said
    code, said = _doctor(capsys, "--repair")
    assert code == 0 and "closed as KILLED" in said, said
    closed = client.get_run(run_id)
    assert closed.info.status == "KILLED" and "batchscope doctor" in closed.data.tags[REASON]
    code, said = _doctor(capsys)
    assert code == 0 and "Healthy." in said, said


def _running_train_run(client: MlflowClient, study: str, proc: subprocess.Popen[str], timeout: float = 120) -> Any:
    """The train run of `study` once it is RUNNING (and the process still is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        exp = client.get_experiment_by_name(study)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE}` = 'train'") if exp else []
        if runs and runs[0].info.status == "RUNNING":
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"no train run of {study} RUNNING within {timeout} s")
