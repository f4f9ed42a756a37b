"""Fault injection for chaos tests: make chosen trials raise, exit hard, or diverge.

Set BATCHSCOPE_FAULTS to a comma-separated list of `KIND@TRIAL[:STEP]`, e.g.
`raise@2,exit@5:30,nan@7,segv@9`. KIND is one of raise (an exception), exit
(the worker process ends at once, as if killed), segv (a segmentation fault),
nan (the loss becomes NaN), hang (the trial stops making progress until it is killed,
so a test can kill a sweep mid-trial without racing a fast trial to its end).
STEP is when it strikes (default: the first logging point). Only for testing batchscope itself; never set in normal use.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from batchscope.trainers.spec import TrainSpec

ENV = "BATCHSCOPE_FAULTS"
KINDS = ("raise", "exit", "segv", "nan", "hang")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def parse(text: str | None) -> dict[int, Fault]:
    faults: dict[int, Fault] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        kind, _, where = item.partition("@")
        trial, _, step = where.partition(":")
        if kind not in KINDS or not trial.isdigit() or (step and not step.isdigit()):
            raise ValueError(f"{ENV}: bad entry {item!r}; expected KIND@TRIAL[:STEP] with KIND in {KINDS}")
        faults[int(trial)] = Fault(kind, int(step) if step else 1)
    return faults


def for_trial(trial_number: int) -> Fault | None:
    return parse(os.environ.get(ENV)).get(trial_number)


def inject(spec: TrainSpec, sink: Any, trial_number: int) -> tuple[TrainSpec, Any]:
    """The spec and sink a trial trains with once its fault (if any) is planted.

    `nan` makes the run truly diverge (a huge SGD step); the others strike from the sink when
    the run reaches the fault's step. A rank without a sink (DDP ranks other than 0) gets none.
    """
    fault = for_trial(trial_number)
    if fault is None:
        return spec, sink
    if fault.kind == "nan":
        return replace(spec, lr=1e12, optimizer="sgd"), sink
    return spec, (FaultySink(sink, fault) if sink is not None else None)


class InjectedFault(RuntimeError):
    """The exception a `raise` fault throws."""


def strike(fault: Fault) -> None:
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault at step {fault.step}")
    if fault.kind == "exit":
        os._exit(17)
    if fault.kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault.kind == "hang":
        while True:  # until the test kills the process
            time.sleep(1.0)


class FaultySink:
    """Wraps a sink; strikes when the run reaches the fault's step."""

    def __init__(self, inner: object, fault: Fault) -> None:
        self._inner = inner
        self._fault = fault
        self._struck = False

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if not self._struck and step >= self._fault.step and self._fault.kind != "nan":
            self._struck = True
            strike(self._fault)
        self._inner.metrics(step, values)  # type: ignore[attr-defined]

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        if not self._struck and first_step + len(values) - 1 >= self._fault.step and self._fault.kind != "nan":
            self._struck = True
            strike(self._fault)
        self._inner.series(key, first_step, values)  # type: ignore[attr-defined]

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        return bool(self._inner.evaluated(step, values))  # type: ignore[attr-defined]

    def params(self, values: Mapping[str, object]) -> None:
        send = getattr(self._inner, "params", None)
        if send is not None:
            send(values)

    def flush(self) -> None:
        flush = getattr(self._inner, "flush", None)
        if flush is not None:
            flush()
