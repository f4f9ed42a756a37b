"""Trials run in a reusable child process, isolated from the sweep.

The sweep process keeps Optuna, the run bookkeeping and the writing of metrics to
MLflow; the worker trains and sends its metric rows through the pipe (MLflow's
per-row Python then never competes with training for the worker's GIL). A crash, a hard exit or a kill of
the worker fails only its trial: the sweep sees the process gone, ends the run
and starts a fresh worker (CUDA errors cannot poison the next trial). Start-up
(importing torch, mlflow) is paid once per worker, not per trial.

A job with `nproc > 1` runs data parallel: the worker starts torchrun with that
many processes (sweeps/ddp_launch.py), waits for it and sends its outcome the same
way. Such trials are not pruned, and their progress is relayed through a file.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchscope.sweeps.child import ProgressThrottle, die_with_parent
from batchscope.sweeps.job import Job, error_outcome
from batchscope.sweeps.spawning import without_callers_main
from batchscope.trainers.spec import TrainResult

if TYPE_CHECKING:
    from batchscope.sweeps.sink import MetricWriter, Row


class WorkerDied(Exception):
    """The worker process ended in the middle of a trial."""


class TrialError(Exception):
    """The trial raised inside the worker; carries the worker's traceback."""

    def __init__(self, message: str, tb: str) -> None:
        super().__init__(message)
        self.worker_traceback = tb


class TrialWorker:
    """One child process that runs trials one after another."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._ctx = mp.get_context("spawn")
        self._env = dict(env or {})
        self._proc: Any = None
        self._conn: Connection | None = None
        self._stop = self._ctx.Event()
        # The trial's metrics are written from here (one writer thread per tracking store): the
        # worker sends rows through the pipe, so MLflow's Python never runs in the training process.
        self._writers: dict[str, MetricWriter] = {}
        self.start()

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        old = {k: os.environ.get(k) for k in self._env}
        os.environ.update(self._env)  # spawn copies the environment at start
        try:
            self._proc = self._ctx.Process(
                target=_worker_main, args=(child, self._stop, os.getpid()), daemon=True, name="batchscope-trial"
            )
            # Not the caller's main module: a script without a main guard would start its sweep again
            # in the child, and fail every trial (sweeps/spawning.py).
            with without_callers_main():
                self._proc.start()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._conn = parent

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def run(
        self,
        job: Job,
        on_step: Callable[[int, float], None] | None = None,
        on_eval: Callable[[int, Mapping[str, float]], bool] | None = None,
    ) -> TrainResult:
        """Run one job; raises WorkerDied or TrialError. The worker is restarted after either."""
        if not self.alive():
            self.start()
        assert self._conn is not None
        self._stop.clear()
        try:
            self._conn.send(("train", job))
            while True:
                msg = self._receive()
                kind = msg[0]
                if kind == "metrics":
                    self._writer(job.tracking_uri).submit(msg[1], msg[2])
                elif kind == "params":
                    self._writer(job.tracking_uri).params(msg[1], msg[2])
                elif kind == "step":
                    if on_step is not None:
                        on_step(msg[1], msg[2])
                elif kind == "eval":
                    keep = on_eval(msg[1], msg[2]) if on_eval is not None else True
                    self._conn.send(("continue", bool(keep)))
                elif kind == "done":
                    result: TrainResult = msg[1]
                    try:
                        self._drain(job)
                    except RuntimeError as exc:
                        raise TrialError(str(exc), "") from exc
                    return result
                elif kind == "error":
                    self._drain(job, quiet=True)
                    self.restart()
                    raise TrialError(msg[1], msg[2])
        except WorkerDied:
            self._drain(job, quiet=True)  # what the trial sent before it died is kept
            self.restart()
            raise

    def _receive(self, deadline: float | None = None) -> tuple[Any, ...]:
        """The worker's next message; WorkerDied if it dies first, TimeoutError past `deadline`."""
        assert self._conn is not None
        while not self._conn.poll(0.2):
            if not self.alive():
                raise WorkerDied(_death_reason(self._proc.exitcode))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
        try:
            msg: tuple[Any, ...] = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(2)
            raise WorkerDied(_death_reason(self._proc.exitcode)) from None
        return msg

    def _writer(self, tracking_uri: str) -> MetricWriter:
        writer = self._writers.get(tracking_uri)
        if writer is None:
            from batchscope.sweeps.sink import MetricWriter

            writer = self._writers[tracking_uri] = MetricWriter(tracking_uri)
        return writer

    def _drain(self, job: Job, *, quiet: bool = False) -> None:
        """Wait until the trial's metrics are in MLflow: the sweep ends the run after this."""
        writer = self._writers.get(job.tracking_uri)
        if writer is None:
            return
        try:
            writer.drain(job.run_id)
        except RuntimeError:
            if not quiet:
                raise

    def export_weights(self, checkpoint: Path, dest: Path, timeout: float = 300.0) -> None:
        """Have the worker (torch already imported) write a checkpoint's model weights to `dest`.

        The sweep process never imports torch: doing it here would stall the sweep for
        seconds the first time a trial's weights are kept. Raises RuntimeError or WorkerDied.
        """
        if not self.alive():
            self.start()
        assert self._conn is not None
        self._conn.send(("weights", str(checkpoint), str(dest)))
        try:
            msg = self._receive(time.monotonic() + timeout)
        except (WorkerDied, TimeoutError) as exc:
            self.restart()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"writing the weights of {checkpoint} took over {timeout:.0f} s") from None
            raise
        if msg[0] != "weights":
            raise RuntimeError(f"the worker answered {msg[0]!r} to a weights request")
        if msg[1] is not None:
            raise RuntimeError(f"could not read the weights from {checkpoint}: {msg[1]}")

    def request_stop(self) -> None:
        """Ask the running trial to stop at its next logging point (it ends as failed, metrics flushed)."""
        self._stop.set()

    def restart(self) -> None:
        self.kill()
        self.start()

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None and self.alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("exit",))
            self._proc.join(5)
        self.kill()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _death_reason(code: int | None) -> str:
    if code is None:
        return "the worker process stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if name == "SIGKILL" else ""
        return f"the worker process died from {name}{hint}"
    return f"the worker process exited with code {code}"


# ---- the child side -------------------------------------------------------------


class PipeTransport:
    """The trial's side of metric writing: rows go through the pipe to the sweep process,
    whose MetricWriter writes them; it drains them before it ends the trial's run."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def submit(self, run_id: str, rows: list[Row]) -> None:
        self._conn.send(("metrics", run_id, rows))

    def check(self, run_id: str) -> None:
        return None  # failures are reported by the sweep process when it drains

    def drain(self, run_id: str) -> None:
        return None

    def params(self, run_id: str, values: Mapping[str, Any]) -> None:
        self._conn.send(("params", run_id, dict(values)))


def _prewarm() -> None:
    """Pay lazy first-use costs while the sweep is still setting up its stores, not on the
    first trial's clock: torch imports torch._dynamo on the first optimizer (about 1.5 s)."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _worker_main(conn: Connection, stop: Any, parent_pid: int) -> None:
    # Ctrl-C is handled by the sweep process, which then asks this worker to stop. SIGTERM (sent by
    # Slurm to every process of a job, or by hand) stops the running trial at its next logging point.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    die_with_parent()
    if os.getppid() != parent_pid:
        return
    from batchscope.sweeps import faults, memcap
    from batchscope.sweeps.ddp_launch import run_distributed
    from batchscope.sweeps.sink import MlflowSink
    from batchscope.sweeps.store_setup import quiet_libraries
    from batchscope.trainers.loop import train

    _prewarm()
    baseline_kb = memcap.vm_size_kb()  # the cap counts from here: torch and its threads loaded
    quiet_libraries()
    transport = PipeTransport(conn)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        if msg[0] == "weights":
            conn.send(("weights", _export_weights(msg[1], msg[2])))
            continue
        if msg[0] != "train":
            continue  # e.g. an evaluation's reply that came after its trial was stopped
        job: Job = msg[1]
        memcap.apply_cap(job.memory_limit_mb if job.nproc == 1 else None, baseline_kb)
        if job.nproc > 1:
            conn.send(run_distributed(job, conn, stop, parent_pid))
            continue

        def on_eval(step: int, values: Mapping[str, float]) -> bool:
            conn.send(("eval", step, dict(values)))
            reply = conn.recv()
            return bool(reply[1])

        sink = MlflowSink(
            transport,
            job.run_id,
            on_eval=on_eval,
            on_metrics=ProgressThrottle(lambda step, loss: conn.send(("step", step, loss))),
        )
        spec, run_sink = faults.inject(job.spec, sink, job.trial_number)
        try:
            result = train(
                spec,
                run_sink,
                should_stop=lambda: stop.is_set() or os.getppid() != parent_pid,
                checkpoint=job.checkpoint,
            )
            sink.close()
            conn.send(("done", result))
        except Exception as exc:
            with contextlib.suppress(Exception):
                sink.close(timeout=30)
            conn.send(error_outcome(exc))


def _export_weights(checkpoint: str, dest: str) -> str | None:
    """The model's weights from a finished trial's checkpoint; None, or why it failed."""
    from batchscope.trainers.checkpoint import export_weights

    try:
        export_weights(Path(checkpoint), Path(dest))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
