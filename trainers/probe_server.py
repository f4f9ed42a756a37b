"""The CPU probe helper of MemoryProber: `python -m batchscope.trainers.probe_server --serve`.

The helper reads one request per line on stdin (base64 of a pickle: it is our own
process) and answers one JSON line per request. For each request it forks a child that
builds the task, takes warm-up steps (threads, arenas, optimizer state), sets
RLIMIT_AS, resets VmHWM and takes the measured steps. The helper never runs a torch op
itself, so every child starts from a process with no thread pools to inherit.

It is started by `MemoryProber` (trainers/memory_probe.py), which sends the requests.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchscope.trainers.data import EmptyEpochError
from batchscope.trainers.device import peak_memory_mb, reset_peak_memory
from batchscope.trainers.loop import is_oom_error
from batchscope.trainers.memory_probe import StepRunner, build_probe_task, decode_request, first_line, train_size
from batchscope.trainers.spec import TrainSpec

# Extra address space allowed above the budget's headroom in a CPU probe: allocations
# are counted in address space before they are touched, and each thread that allocates
# makes glibc reserve a 64 MB arena (16 threads on a 16-core machine: 1 GB reserved,
# almost none of it resident). The measured resident peak, not this limit, decides
# whether a probe fits; the limit only stops a far too big probe before it swaps.
_AS_SLACK_MB = 64.0
_AS_SLACK_FRACTION = 0.05
_AS_SLACK_PER_THREAD_MB = 64.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def _child_probe(request: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
    """In the forked child: warm up, limit the address space, measure the training steps."""
    spec: TrainSpec = request["spec"]
    batch_size: int | None = request["batch_size"]
    budget: float = request["budget_mb"]
    device = torch.device("cpu")
    baseline: float | None = None
    loaded = set(sys.modules)
    try:
        task, precision = build_probe_task(spec, device)
        num_train = train_size(spec, task)
        runner = StepRunner(spec, task, device, precision)
        runner.run(min(2, batch_size or 2))
        # Start the intra-op thread pool (their stacks) before the limit: steps that small may not.
        torch.ones(1 << 22).add_(1)
        # The helper imports these too, so that later children do not import them again.
        report({"num_train": num_train, "imported": [m for m in sys.modules if m not in loaded]})
        if batch_size is None:
            report({"status": "primed"})
            return
        baseline = _status_mb("VmRSS")
        headroom = budget - baseline
        if math.isfinite(headroom):
            headroom = max(headroom, 0.0)
            slack = _AS_SLACK_MB + _AS_SLACK_FRACTION * headroom + _AS_SLACK_PER_THREAD_MB * torch.get_num_threads()
            limit_mb = _status_mb("VmSize") + headroom + slack
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = int(limit_mb * 2**20)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        report({"armed": True, "baseline_mb": baseline})
        reset_peak_memory(device)
        runner.run(batch_size)
        peak = peak_memory_mb(device)
        report({"status": "ok", "peak_mb": peak, "baseline_mb": baseline, "num_train": num_train})
    except EmptyEpochError as exc:  # a stream smaller than the batch: the data's cap, not memory's
        report({"status": "no_batch", "detail": str(exc), "baseline_mb": baseline})
    except ValueError as exc:  # the recipe refused its options or its data: its own one line, no traceback
        report({"status": "refused", "detail": str(exc).strip()})
    except Exception as exc:
        if is_oom_error(exc):
            report({"status": "oom", "detail": first_line(exc), "baseline_mb": baseline})
        else:
            report({"status": "error", "detail": traceback.format_exc()})


def _serve() -> None:
    """The helper process: fork one child per request line, answer one JSON line each."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the replies
    # Every optimizer's constructor imports torch._dynamo (seconds): once here, not per child.
    _import_quietly(["torch._dynamo"])
    for line in sys.stdin:
        if not line.strip():
            continue
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            code = 0
            try:
                request = decode_request(line)
                _child_probe(request, functools.partial(_write_message, write_fd))
            except BaseException:
                code = 1
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            messages = [json.loads(m) for m in r.read().splitlines() if m.strip()]
        _, wait_status = os.waitpid(pid, 0)
        reply: dict[str, Any] = {}
        for m in messages:
            reply.update(m)
        if "status" not in reply:
            reply.update(_died(wait_status, armed=bool(reply.get("armed"))))
        imported = reply.pop("imported", [])
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
        _import_quietly(imported)


def _import_quietly(names: Sequence[str]) -> None:
    """Import what a probe child imported (recipe data libraries, torch._dynamo for the
    optimizers): seconds per child on a small machine. Imports only, never a torch op."""
    for name in names:
        if name in sys.modules or name.startswith("__"):
            continue
        try:
            importlib.import_module(name)
        except Exception:
            continue


def _write_message(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _died(wait_status: int, *, armed: bool) -> dict[str, Any]:
    """A child that ended without a reply: killed (the OOM killer) or crashed."""
    if os.WIFSIGNALED(wait_status):
        sig = signal.Signals(os.WTERMSIG(wait_status)).name
        if sig == "SIGKILL":
            return {"status": "oom", "detail": "killed by SIGKILL (the kernel's out-of-memory killer?)"}
        if armed:
            # Under the address-space limit, a crash is an allocation that failed where no
            # exception could be raised (a thread stack, an abort in a C++ library).
            return {"status": "oom", "detail": f"crashed with {sig} under the address-space limit"}
        return {"status": "error", "detail": f"the probe process crashed with {sig} before the measured steps"}
    return {"status": "error", "detail": f"the probe process exited with status {os.WEXITSTATUS(wait_status)}"}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        sys.exit("usage: python -m batchscope.trainers.probe_server --serve (the CPU probe helper of MemoryProber)")
