"""The Optuna journal survives a torn write: four corruptions of a real finished study, and a failed append.

A torn tail (the last record cut short) is set aside with one warning line and every command
works; a corrupt line in the middle is refused by every command in one line, exit code 2,
nothing changed. A write that fails (a full disk) leaves no partial record.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from batchscope.sweeps.errors import UserError
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config

STUDY = "torn"
WARNING = "not a complete record"  # in the one warning line that says where the torn record went


def _config() -> dict:
    cfg = small_config(STUDY)
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["n_trials"] = 3
    return cfg


def _start(base: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, BATCHSCOPE_ROOT=str(base / "mlruns"), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "batchscope.sweeps.cli", *args],
        cwd=base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _finish(_start(base, *args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real finished study of 3 trials, copied by each test that changes it."""
    base = tmp_path_factory.mktemp("finished")
    write_config(base / "study.yaml", _config())
    proc = _cli(base, "sweep", "study.yaml", "--no-report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _journal(base: Path) -> Path:
    return base / "mlruns" / "optuna.journal"


def _plain(journal: Path) -> optuna.Study:
    """The study as Optuna's own backend replays it (read only; nothing is set aside)."""
    return optuna.load_study(study_name=STUDY, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))


def _trials(journal: Path) -> list[tuple]:
    return [(t.number, t.state.name, t.params, t.values) for t in _plain(journal).trials]


def _expected(tmp_path: Path, contents: bytes) -> list[tuple]:
    reference = tmp_path / "reference.journal"
    reference.write_bytes(contents)
    return _trials(reference)


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


# ---- the four corruptions: (corrupted journal, its complete records) -------------------------


def truncated_last_line(data: bytes) -> tuple[bytes, bytes]:
    """The disk filled as the last trial finished: its COMPLETE record is cut in half, nothing after it."""
    lines = _lines(data)
    last_state = max(i for i, line in enumerate(lines) if line.startswith(b'{"op_code":6,'))
    complete = b"".join(lines[:last_state])
    return complete + lines[last_state][: len(lines[last_state]) // 2], complete


def partial_record(data: bytes) -> tuple[bytes, bytes]:
    """A process killed mid-append: a record without its end or newline."""
    return data + b'{"op_code":8,"worker_id":"killed","trial_id":0,"user_attr":{"sta', data


def garbage_line(data: bytes) -> tuple[bytes, bytes]:
    """A line that is not a record at all (not JSON, not even UTF-8), newline included."""
    return data + b"\x00\x00 not a record \xff\n", data


def corrupted_byte(data: bytes) -> tuple[bytes, int]:
    """One byte in the middle of the file made invalid; returns the 1-based number of that line."""
    lines = _lines(data)
    middle = len(lines) // 2
    bad = bytearray(lines[middle])
    bad[len(bad) // 2] = 0xFF
    return b"".join([*lines[:middle], bytes(bad), *lines[middle + 1 :]]), middle + 1


TORN: dict[str, Callable[[bytes], tuple[bytes, bytes]]] = {
    "truncated last line": truncated_last_line,
    "partial record without newline": partial_record,
    "garbage line appended": garbage_line,
}


# ---- in one process: the backend itself ---------------------------------------------------


@pytest.mark.parametrize("kind", list(TORN))
def test_a_torn_tail_is_set_aside_with_one_warning_line(
    kind: str, finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "optuna.journal"
    corrupted, complete = TORN[kind](_journal(finished).read_bytes())
    journal.write_bytes(corrupted)
    with caplog.at_level(logging.WARNING, logger="batchscope.sweeps.journal"):
        study = optuna.load_study(study_name=STUDY, storage=journal_storage(journal))
    # The study opens as of its last complete record; the torn bytes are in the sidecar, none lost.
    assert [(t.number, t.state.name, t.params, t.values) for t in study.trials] == _expected(tmp_path, complete)
    assert journal.read_bytes() == complete
    (sidecar,) = tmp_path.glob("optuna.journal.torn-*")
    assert sidecar.read_bytes() == corrupted[len(complete) :]
    warnings = [r.getMessage() for r in caplog.records if r.name == "batchscope.sweeps.journal"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(sidecar) in warnings[0], warnings
    # Opened again: nothing more to set aside, nothing said.
    caplog.clear()
    journal_storage(journal)
    assert not caplog.records and len(list(tmp_path.glob("optuna.journal.torn-*"))) == 1


def test_a_corrupt_middle_line_is_refused_in_one_line_and_nothing_changes(finished: Path, tmp_path: Path) -> None:
    journal = tmp_path / "optuna.journal"
    corrupted, line = corrupted_byte(_journal(finished).read_bytes())
    journal.write_bytes(corrupted)
    with pytest.raises(UserError) as refused:
        journal_storage(journal)
    message = str(refused.value)
    assert "\n" not in message and str(journal) in message and f"line {line} " in message
    assert "batchscope doctor --repair" in message
    assert journal.read_bytes() == corrupted and sorted(p.name for p in tmp_path.iterdir()) == ["optuna.journal"]


def test_a_record_torn_by_a_writer_that_died_since_opening_is_set_aside_before_the_next_append(
    finished: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "optuna.journal"
    shutil.copyfile(_journal(finished), journal)
    study = optuna.load_study(study_name=STUDY, storage=journal_storage(journal))
    fragment = b'{"op_code":8,"worker_id":"died","trial_id":1,"user_attr":{"x'
    with open(journal, "ab") as f:  # another process, killed mid-write
        f.write(fragment)
    study.set_user_attr("after", 1)  # must not glue onto the fragment
    (sidecar,) = tmp_path.glob("optuna.journal.torn-*")
    assert sidecar.read_bytes() == fragment
    reopened = optuna.load_study(
        study_name=STUDY, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    )
    assert reopened.user_attrs["after"] == 1


def test_corruption_written_after_opening_is_refused_in_one_line(finished: Path, tmp_path: Path) -> None:
    journal = tmp_path / "optuna.journal"
    shutil.copyfile(_journal(finished), journal)
    storage = journal_storage(journal)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    lines = _lines(journal.read_bytes())
    with open(journal, "ab") as f:  # a writer that does not take the lock, or a disk that returned garbage
        f.write(b"{garbage\n" + lines[-1])
    with pytest.raises(UserError) as refused:
        study.get_trials()  # Optuna reads new records on every sync
    assert f"line {len(lines) + 1} " in str(refused.value) and "batchscope doctor --repair" in str(refused.value)


_FULL_DISK = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
import optuna
from batchscope.sweeps.store_setup import journal_storage

path = sys.argv[1]
study = optuna.load_study(study_name=sys.argv[2], storage=journal_storage(path))
size = os.path.getsize(path)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # room for 100 bytes of a 20 kB record
try:
    study.set_user_attr("big", "x" * 20_000)
except OSError as exc:
    print("refused", exc.errno, os.path.getsize(path) - size)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
study.set_user_attr("small", 1)  # space freed: the next write lands whole, on its own line
"""


def test_a_failed_write_leaves_no_partial_record(finished: Path, tmp_path: Path) -> None:
    """A file-size limit makes the write stop part-way (as a full disk does): the part is cut back off."""
    import errno

    journal = tmp_path / "optuna.journal"
    shutil.copyfile(_journal(finished), journal)
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(journal), STUDY],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused", str(errno.EFBIG), "0"]  # nothing of the failed record is left
    study = optuna.load_study(
        study_name=STUDY, storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    )
    assert "big" not in study.user_attrs and study.user_attrs["small"] == 1
    assert not list(tmp_path.glob("optuna.journal.torn-*"))


# ---- the commands, in their own processes ----------------------------------------------------


def _one_warning(proc: subprocess.CompletedProcess[str], sidecar: Path) -> None:
    said = [line for line in proc.stderr.splitlines() if WARNING in line]
    assert len(said) == 1 and str(sidecar) in said[0], proc.stderr


@pytest.mark.parametrize(
    ("kind", "first"),
    [
        ("truncated last line", "sweep"),
        ("partial record without newline", "report"),
        ("garbage line appended", "export"),
        ("partial record without newline", "status"),
    ],
)
def test_every_command_works_on_a_torn_tail(kind: str, first: str, copy: Path, tmp_path: Path) -> None:
    """The first command meets the torn record: one warning line, and it works; every complete trial is kept."""
    journal = _journal(copy)
    corrupted, complete = TORN[kind](journal.read_bytes())
    journal.write_bytes(corrupted)
    kept = _expected(tmp_path, complete)
    args = {
        "sweep": ["sweep", "study.yaml", "--no-report", "--n-trials", "4"],
        "report": ["report", STUDY, "--no-log", "--out", "out"],
        "export": ["export", STUDY, "--out", "out"],
        "status": ["status", STUDY],
    }[first]
    proc = _cli(copy, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    (sidecar,) = journal.parent.glob("optuna.journal.torn-*")
    _one_warning(proc, sidecar)
    assert sidecar.read_bytes() == corrupted[len(complete) :]
    if first == "report":
        assert (copy / "out" / STUDY / "index.html").is_file()
    if first == "export":
        assert (copy / "out" / f"{STUDY}_trials.csv").is_file()

    status = _cli(copy, "status", STUDY)
    assert status.returncode == 0 and WARNING not in status.stderr, status.stderr
    trials = _trials(journal)
    if first != "sweep":
        assert trials == kept
        return
    # Resumed: the trials complete before the tear are all there, the torn one was re-run, no RUNNING
    # trial or run is left, and trials and runs are one to one.
    complete_before = [t for t in kept if t[1] == "COMPLETE"]
    assert [t for t in trials if t[0] in {k[0] for k in complete_before}] == complete_before
    assert sum(t[1] in ("COMPLETE", "PRUNED") for t in trials) == 4
    assert all(t[1] != "RUNNING" for t in trials)
    _assert_one_to_one(copy)


def _assert_one_to_one(base: Path) -> None:
    study = optuna.load_study(study_name=STUDY, storage=journal_storage(_journal(base)))
    client = MlflowClient(f"sqlite:///{base / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(STUDY)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert all(r.info.status != "RUNNING" for r in runs)
    children = {}
    for r in runs:
        if r.data.tags.get("batchscope.role") == "trial":
            number = int(r.data.tags["optuna.trial_number"])
            assert number not in children, f"two runs for trial {number}"
            children[number] = r.info.run_id
    trials = [t for t in study.trials if t.state != TrialState.WAITING]
    assert {t.number: t.user_attrs["mlflow_run_id"] for t in trials} == children


def test_every_command_refuses_a_corrupt_middle_line_in_one_line(copy: Path) -> None:
    journal = _journal(copy)
    corrupted, line = corrupted_byte(journal.read_bytes())
    journal.write_bytes(corrupted)
    commands = (
        ["status", STUDY],
        ["export", STUDY, "--out", "out"],
        ["report", STUDY, "--no-log", "--out", "out"],
        ["sweep", "study.yaml", "--no-report", "--n-trials", "5"],
    )
    started = [_start(copy, *args) for args in commands]  # together: each only reads, and refuses
    for args, running in zip(commands, started, strict=True):
        proc = _finish(running)
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(said) == 1 and "Traceback" not in proc.stdout + proc.stderr, (args, proc.stderr)
        assert f"line {line} " in said[0] and "batchscope doctor --repair" in said[0], said
    # Nothing was changed or set aside, and nothing was written anywhere.
    assert journal.read_bytes() == corrupted
    assert not list(journal.parent.glob("optuna.journal.*-*")) and not (copy / "out").exists()
