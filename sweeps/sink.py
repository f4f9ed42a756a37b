"""Metrics on their way to MLflow: a sink for the training loop, and the thread that writes.

The sink buffers rows and hands them over in batches; a MetricWriter writes them
with `log_batch` from a background thread. In a sweep the two live in different
processes (the trial's worker sends rows through its pipe, the sweep process writes),
so this module imports MLflow only where it writes: the worker never pays for it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

# The loop's sink contract: a plain module (no torch), so the sweep process may import it.
from batchscope.trainers.spec import Sink

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from batchscope.sweeps.sqlite_metrics import SqliteMetricLog

_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch request
MAX_PARAM_LEN = 6000  # MLflow's limit on a param's value


def now_ms() -> int:
    return int(time.time() * 1000)


def log_rows(client: MlflowClient, run_id: str, rows: Sequence[Row]) -> None:
    """Write rows to a run with as few `log_batch` requests as MLflow's limit allows."""
    from mlflow.entities import Metric

    metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows]
    for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])


def params_of(values: Mapping[str, Any]) -> list[Param]:
    """MLflow params from a mapping (None values left out, long values cut to MLflow's limit)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in values.items() if v is not None]


# One metric value as it travels to the writer: (key, value, timestamp in ms, step). Plain
# tuples, so that a batch of them is cheap to pickle from a trial's process to the sweep's.
Row = tuple[str, float, int, int]


class MetricTransport(Protocol):
    """Where an MlflowSink sends its rows: a MetricWriter in this process, or a pipe to one."""

    def submit(self, run_id: str, rows: list[Row]) -> None: ...

    def check(self, run_id: str) -> None:
        """Raise if writing this run's metrics has failed."""

    def drain(self, run_id: str) -> None:
        """Return once everything submitted for the run is written (or raise why not)."""

    def params(self, run_id: str, values: Mapping[str, Any]) -> None:
        """Log the run's params now (what the trainer resolved: device, precision, micro-batch...)."""


class MetricWriter:
    """Writes metric rows to MLflow from a background thread, merged into requests of up to 1,000.

    `submit` never blocks. The thread opens its own MlflowClient (from `tracking_uri`) on
    first use, so creating a writer costs the caller nothing. In a sweep the writer lives
    in the sweep process and the trial's process sends it rows through the worker's pipe
    (sweeps/worker.py): MLflow's per-row work (SQLAlchemy, in Python) then never holds the
    training process's GIL.
    """

    def __init__(self, tracking_uri: str | None = None, *, client: MlflowClient | None = None) -> None:
        if (tracking_uri is None) == (client is None):
            raise ValueError("MetricWriter needs exactly one of tracking_uri and client.")
        self._uri = tracking_uri
        self._client = client
        self._queue: queue.Queue[tuple[str, list[Row]] | None] = queue.Queue()
        self._errors: dict[str, BaseException] = {}
        self._lock = threading.Condition()
        self._submitted = 0
        self._written = 0
        self._fast: SqliteMetricLog | Literal[False] | None = None  # None: not looked at yet
        self._thread = threading.Thread(target=self._write_loop, name="mlflow-metric-writer", daemon=True)
        self._thread.start()

    def submit(self, run_id: str, rows: list[Row]) -> None:
        if not rows:
            return
        with self._lock:
            self._submitted += 1
        self._queue.put((run_id, rows))

    def check(self, run_id: str) -> None:
        error = self._errors.get(run_id)
        if error is not None:
            raise RuntimeError(f"writing metrics to MLflow failed: {error}") from error

    def drain(self, run_id: str, timeout: float = 120.0) -> None:
        with self._lock:
            target = self._submitted
            if not self._lock.wait_for(lambda: self._written >= target, timeout):
                raise RuntimeError(f"writing metrics to MLflow did not finish within {timeout:.0f} s")
        self.check(run_id)

    def params(self, run_id: str, values: Mapping[str, Any]) -> None:
        """Log params at once, from the caller's thread (a handful, once per run)."""
        from mlflow import MlflowClient

        (self._client or MlflowClient(self._uri)).log_batch(run_id, params=params_of(values))

    def close(self, timeout: float = 120.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        if self._fast and not self._thread.is_alive():
            self._fast.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # Merge whatever else is already waiting into as few requests as possible.
            items, done = [item], False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                items.append(more)
            by_run: dict[str, list[Row]] = {}
            for run_id, rows in items:
                by_run.setdefault(run_id, []).extend(rows)
            for run_id, rows in by_run.items():
                if run_id in self._errors:
                    continue  # that run's writing has failed; its error is reported, not repeated
                try:
                    self._log(run_id, rows)
                except Exception as exc:  # reported to the trial by check() / drain()
                    self._errors[run_id] = exc
            with self._lock:
                self._written += len(items)
                self._lock.notify_all()
            if done:
                return

    def _log(self, run_id: str, rows: list[Row]) -> None:
        """Rows of keys MLflow has taken before go straight into a local SQLite store (see
        sweeps.sqlite_metrics: the same rows, a tenth of the time); the rest through log_batch."""
        if self._fast is None and self._uri is not None:  # a writer given a client: MLflow only
            from batchscope.sweeps.sqlite_metrics import SqliteMetricLog

            self._fast = SqliteMetricLog.open(self._uri) or False
        if self._fast and self._fast.takes(rows):
            self._fast.log(run_id, rows)
            return
        if self._client is None:
            from mlflow import MlflowClient

            assert self._uri is not None
            self._client = MlflowClient(self._uri)
        log_rows(self._client, run_id, rows)
        if self._fast:
            self._fast.accepted.update(key for key, _, _, _ in rows)


class MlflowSink(Sink):
    """A trainers.spec.Sink that buffers metric rows and hands them to a writer in batches.

    `target` is an MlflowClient (the sink then runs its own MetricWriter thread) or a
    MetricTransport. Rows go out when `flush_rows` have gathered or `flush_s` seconds
    have passed, and at `close()`, which returns once they are written. Per-step losses
    (`series`) get timestamps spread evenly over their logging window, so wall-time
    charts do not show them in steps. `on_eval` lets the sweep add pruning (return
    False to stop) and progress display.
    """

    def __init__(
        self,
        target: MlflowClient | MetricTransport,
        run_id: str,
        *,
        on_eval: Callable[[int, Mapping[str, float]], bool] | None = None,
        on_metrics: Callable[[int, Mapping[str, float]], None] | None = None,
        flush_rows: int = 1000,
        flush_s: float = 0.25,
    ) -> None:
        self._own: MetricWriter | None = None
        if not hasattr(target, "submit"):  # an MlflowClient
            self._own = MetricWriter(client=target)
            target = self._own
        self._out: MetricTransport = target  # type: ignore[assignment]
        self._run_id = run_id
        self._on_eval = on_eval
        self._on_metrics = on_metrics
        self._flush_rows = flush_rows
        self._flush_s = flush_s
        self._buffer: list[Row] = []
        self._last_flush = time.monotonic()
        self._series_ts: dict[str, int] = {}
        self._closed = False

    # -- trainers.Sink ---------------------------------------------------------
    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self._add(step, values)
        if self._on_metrics is not None:
            self._on_metrics(step, values)
        self._maybe_flush()

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        if not values:
            return
        now = now_ms()
        n = len(values)
        prev = min(self._series_ts.get(key, now), now)
        span = now - prev
        self._buffer.extend((key, float(v), prev + span * (i + 1) // n, first_step + i) for i, v in enumerate(values))
        self._series_ts[key] = now
        if self._on_metrics is not None:
            self._on_metrics(first_step + n - 1, {key: values[-1]})
        self._maybe_flush()

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        self._add(step, values)
        self._maybe_flush()
        return self._on_eval(step, values) if self._on_eval is not None else True

    def params(self, values: Mapping[str, Any]) -> None:
        """What the trainer resolved, logged as the run's params before its first step."""
        self._out.params(self._run_id, values)

    # -- writing ---------------------------------------------------------------
    def _add(self, step: int, values: Mapping[str, float]) -> None:
        ts = now_ms()
        self._buffer.extend((k, float(v), ts, step) for k, v in values.items())

    def _maybe_flush(self) -> None:
        if len(self._buffer) >= self._flush_rows or time.monotonic() - self._last_flush >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        self._out.check(self._run_id)
        self._last_flush = time.monotonic()
        if self._buffer:
            self._out.submit(self._run_id, self._buffer)
            self._buffer = []

    def close(self, timeout: float = 120.0) -> None:
        """Send everything still buffered and wait until the writer has written it."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            self._out.drain(self._run_id)
        finally:
            if self._own is not None:
                self._own.close(timeout)
