"""Faults a sweep survives: crashes, hard exits, NaN, SIGKILL of the sweep, Ctrl-C; parallel trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config


def _journal(root: Path) -> optuna.storages.JournalStorage:
    return journal_storage(root / "optuna.journal")


def _sweep_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchscope.sweeps.cli", "sweep", str(config), "--no-report", *extra]


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BATCHSCOPE_ROOT"] = str(workdir / "mlruns")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _finished(root: Path, study: str) -> int:
    if not (root / "optuna.journal").exists():
        return 0
    try:
        s = optuna.load_study(study_name=study, storage=_journal(root))
    except KeyError:
        return 0
    return len(s.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _children(workdir: Path, study: str) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return runs


def _fast(study: str, n_trials: int, **kw: object) -> dict:
    cfg = small_config(study, **kw)
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["n_trials"] = n_trials
    return cfg


def test_chaos_sweep_accounts_for_every_trial(workdir: Path) -> None:
    """20 trials; some raise, some exit hard or segfault, some diverge; the sweep itself is SIGKILLed once."""
    study = "chaos"
    config = write_config(workdir / "chaos.yaml", _fast(study, 20))
    faults = "raise@1,exit@3:5,nan@5,segv@7:12,raise@9:15,nan@12"
    env = _env(workdir, BATCHSCOPE_FAULTS=faults)
    root = workdir / "mlruns"

    # Trial 10 hangs in the first run only, so the kill below always finds a trial running.
    hanging = _env(workdir, BATCHSCOPE_FAULTS=faults + ",hang@10")
    proc = subprocess.Popen(
        _sweep_cmd(config), env=hanging, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    # Kill the sweep with SIGKILL while a trial is running, after a few have finished.
    while time.monotonic() < deadline and proc.poll() is None:
        if _finished(root, study) >= 6:
            s = optuna.load_study(study_name=study, storage=_journal(root))
            if s.get_trials(states=(TrialState.RUNNING,)):
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.3)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the sweep should have been killed mid-trial"

    # The same command again continues the study to n_trials.
    rerun = subprocess.run(_sweep_cmd(config), env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Traceback" not in rerun.stdout + rerun.stderr

    s = optuna.load_study(study_name=study, storage=_journal(root))
    trials = s.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 20
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:
        # Every trial is accounted for: completed, failed with a reason, or diverged.
        assert t.user_attrs.get("status") in ("ok", "failed", "diverged", "pruned", "oom"), t
        if t.state == TrialState.FAIL:
            assert t.user_attrs["status"] == "failed" and t.user_attrs["reason"], t
    statuses = {t.number: t.user_attrs["status"] for t in trials}
    assert statuses[1] == "failed" and "injected fault" in trials[1].user_attrs["reason"]
    assert statuses[3] == "failed" and "exited" in trials[3].user_attrs["reason"]
    assert statuses[5] == "diverged" and trials[5].state == TrialState.PRUNED
    assert statuses[7] == "failed" and "SIGSEGV" in trials[7].user_attrs["reason"]
    # The trial that was running when the sweep was killed failed and was re-run with the same params;
    # one killed between Optuna's ask and its sampling has none, and a new trial takes its place.
    killed = [t for t in trials if "its worker stopped" in t.user_attrs.get("reason", "")]
    assert killed, "the trial running when the sweep was killed is accounted for"
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    for t in killed:
        assert t.state == TrialState.FAIL
        if t.params:
            assert retries[t.number].params == t.params, "re-run with the same parameters"
        else:
            assert "before this trial's parameters were sampled" in t.user_attrs["reason"]
            assert t.number not in retries

    # MLflow: no run left RUNNING; child runs match Optuna trials one to one.
    runs = _children(workdir, study)
    assert all(r.info.status != "RUNNING" for r in runs)
    children = [r for r in runs if r.data.tags.get("batchscope.role") == "trial"]
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert len(by_trial) == len(children) == len(trials)
    for t in trials:
        run = by_trial[t.number]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["batchscope.status"] == t.user_attrs["status"]
        expected = {"ok": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "failed": ("FAILED", "KILLED")}
        assert run.info.status in expected[t.user_attrs["status"]]


def _interruptible() -> None:
    """In the sweep's process before exec: Ctrl-C as a terminal delivers it, whatever this process has.

    A child inherits ignored and blocked signals; a library in the test process may leave
    SIGINT so, and the sweep would then never see the interrupt (a Python started with
    SIGINT ignored keeps ignoring it, as a background job should).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _signal_state(pid: str) -> str:
    """SigBlk/SigIgn/SigCgt of a process (Linux), for the failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "?"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_ctrl_c_stops_consistently_and_the_rerun_resumes_from_the_checkpoint(workdir: Path) -> None:
    study = "ctrlc"
    # One long trial, so the interrupt surely lands while it runs (2,000 steps at batch 16 once took
    # under a second on a quiet machine, and the trial ended before the signal came).
    steps = 8000
    cfg = _fast(study, 1)
    # Every step's train/loss (the option): the resumed run's history must hold each step once.
    cfg["train"].update(
        {"max_steps": steps, "eval_every": 50, "checkpoint": {"every_steps": 50}, "log_every_step": True}
    )
    cfg["search"]["batch_size"] = {"values": [16]}
    config = write_config(workdir / "c.yaml", cfg)
    env = _env(workdir)
    root = workdir / "mlruns"
    inherited = _signal_state("self")
    proc = subprocess.Popen(
        _sweep_cmd(config),
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_interruptible,
    )
    ckpt_dir = root / "checkpoints" / study
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(ckpt_dir.glob("trial-0-*.pt")):
        time.sleep(0.2)
    time.sleep(0.2)
    child = _signal_state(str(proc.pid))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, f"signals of this process: {inherited}; of the sweep: {child}")
    assert b"Traceback" not in out

    s = optuna.load_study(study_name=study, storage=_journal(root))
    t0 = s.trials[0]
    assert t0.state == TrialState.FAIL and "interrupted" in t0.user_attrs["reason"], out.decode()
    runs = _children(workdir, study)
    assert all(r.info.status != "RUNNING" for r in runs)
    parent = next(r for r in runs if r.data.tags.get("batchscope.role") == "sweep")
    assert parent.info.status == "KILLED"

    rerun = subprocess.run(_sweep_cmd(config), env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    s = optuna.load_study(study_name=study, storage=_journal(root))
    retry = [t for t in s.trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(retry[0].user_attrs["mlflow_run_id"])
    assert int(run.data.params["resumed_from_step"]) >= 50  # resumed, not restarted from step 0
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged == list(range(1, steps + 1))  # complete history, no duplicates


def test_parallel_workers_complete_every_trial(workdir: Path) -> None:
    study = "parallel"
    config = write_config(workdir / "p.yaml", _fast(study, 12))
    proc = subprocess.run(
        _sweep_cmd(config, "--workers", "2"),
        env=_env(workdir),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for bad in ("Traceback", "database is locked", "Error", "error"):
        assert bad not in log, log
    s = optuna.load_study(study_name=study, storage=_journal(workdir / "mlruns"))
    assert len(s.get_trials(states=(TrialState.COMPLETE,))) == 12
    children = [r for r in _children(workdir, study) if r.data.tags.get("batchscope.role") == "trial"]
    assert len(children) == 12
    assert len({r.data.tags["optuna.trial_number"] for r in children}) == 12


def test_a_trial_killed_before_recording_its_run_is_linked_to_it_on_recovery(workdir: Path) -> None:
    """SIGKILL between creating the MLflow run and recording its id on the trial: recovery finds the run."""
    import socket

    from batchscope.sweeps.config_load import validate
    from batchscope.sweeps.runner import Sweep
    from batchscope.sweeps.tracking import STUDY, TRIAL

    sweep = Sweep(validate(_fast("orphan", 2), "test"))
    trial = sweep.study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # a process that does not exist
    run_id = sweep.tracker.trial_run(
        sweep.experiment_id, sweep.parent_run_id, "trial 0", {}, {STUDY: "orphan", TRIAL: str(trial.number)}
    )
    # A second one killed even before its run was created.
    runless = sweep.study.ask()
    runless.set_user_attr("worker", f"{socket.gethostname()}:999999999")
    assert sweep.recover() == 2
    dead = sweep.study.trials[trial.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["mlflow_run_id"] == run_id
    children = [r for r in _children(workdir, "orphan") if r.data.tags.get("batchscope.role") == "trial"]
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in children)  # one run per trial
    assert sweep.study.trials[runless.number].user_attrs["mlflow_run_id"] in {r.info.run_id for r in children}


def test_a_trial_ended_before_its_run_existed_gets_a_closed_run_when_the_sweep_starts(workdir: Path) -> None:
    """A disk that filled as a trial's run was being created: the journal took the FAIL, MLflow not the
    run. The next sweep's start gives it a closed run (once); a trial that gave way keeps none."""
    from batchscope.sweeps.config_load import validate
    from batchscope.sweeps.owners import NOT_RUN
    from batchscope.sweeps.runner import Sweep

    sweep = Sweep(validate(_fast("runless", 2), "test"))
    ended = sweep.study.ask({"batch_size": optuna.distributions.CategoricalDistribution([16, 64, 256])})
    ended.set_user_attr("reason", "the sweep stopped during this trial")
    sweep.study.tell(ended, state=TrialState.FAIL)
    gave_way = sweep.study.ask()
    gave_way.set_user_attr("reason", f"{NOT_RUN} other workers had already started the study's last trials")
    sweep.study.tell(gave_way, state=TrialState.FAIL)
    for _ in range(2):  # two sweep starts: one closed run, not two
        sweep.recover(close_runs=True)
    children = [r for r in _children(workdir, "runless") if r.data.tags.get("batchscope.role") == "trial"]
    assert [(r.data.tags["optuna.trial_number"], r.info.status) for r in children] == [(str(ended.number), "KILLED")]
    assert children[0].data.tags["batchscope.reason"] == "the sweep stopped during this trial"


def test_a_trial_killed_before_its_parameters_were_sampled_is_not_re_run_with_none(workdir: Path) -> None:
    """A sweep killed between Optuna's ask and the sampling: that trial fails; no empty 'retry' is queued."""
    import socket

    from batchscope.sweeps import space
    from batchscope.sweeps.config_load import validate
    from batchscope.sweeps.runner import Sweep

    cfg = validate(_fast("unsampled", 2), "test")
    sweep = Sweep(cfg)
    dead_worker = f"{socket.gethostname()}:999999999"  # a process that does not exist
    running = sweep.study.ask()
    params = space.suggest(running, cfg.search)
    running.set_user_attr("worker", dead_worker)
    unsampled = sweep.study.ask()
    unsampled.set_user_attr("worker", dead_worker)
    assert sweep.recover() == 2
    trials = sweep.study.get_trials()
    assert trials[running.number].state == trials[unsampled.number].state == TrialState.FAIL
    assert "re-run with the same parameters" in trials[running.number].user_attrs["reason"]
    assert "before this trial's parameters were sampled" in trials[unsampled.number].user_attrs["reason"]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in queued] == [running.number]
    assert space.suggest(sweep.study.ask(), cfg.search) == params  # the queued retry gets the same ones
