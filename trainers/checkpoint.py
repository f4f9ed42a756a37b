"""Checkpoints of a training run: everything needed to continue it exactly where it stopped.

Model, optimizer, scheduler, gradient scaler, batch order, RNG states, the step,
the run's measurements so far and its metric history (so a resumed run's history
continues without gaps or duplicates). Written atomically; read with
`weights_only=True`, so a checkpoint file cannot run code.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A plain description, in trainers.spec: the sweep process builds one without importing torch.
from batchscope.trainers.spec import CheckpointPolicy

FORMAT_VERSION = 1


@dataclass
class RunState:
    """The loop's own bookkeeping, saved with the checkpoint."""

    step: int = 0
    train_time: float = 0.0
    last_eval_step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    evals: dict[str, float] = field(default_factory=dict)
    # Steps and training time to the target, interpolated between evaluations (trainers.evaluation.crossing);
    # the evaluation steps that bracket the crossing; (step, value, time) of the last evaluation short of it.
    target_step: float | None = None
    target_time_s: float | None = None
    target_bracket: list[int] | None = None
    target_before: list[float] | None = None
    # The first step's training loss: a loss far above it counts as a divergence.
    initial_loss: float | None = None
    # (step, {metric: value}) in the order the sink received them
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    # The noise-scale cadence once chosen (trainers.noise_scale_in_loop.Cadence): a resumed run keeps it.
    gns_every: int | None = None
    # What the task's batches counted (DataTask.count, e.g. tokens) up to the last evaluation.
    counted: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "train_time": self.train_time,
            "last_eval_step": self.last_eval_step,
            "best": dict(self.best),
            "evals": dict(self.evals),
            "target_step": self.target_step,
            "target_time_s": self.target_time_s,
            "target_bracket": self.target_bracket,
            "target_before": self.target_before,
            "initial_loss": self.initial_loss,
            "history": [(s, dict(v)) for s, v in self.history],
            "gns_every": self.gns_every,
            "counted": self.counted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        return cls(
            step=int(d["step"]),
            train_time=float(d["train_time"]),
            last_eval_step=int(d["last_eval_step"]),
            best=dict(d["best"]),
            evals=dict(d["evals"]),
            target_step=d["target_step"],
            target_time_s=d["target_time_s"],
            target_bracket=d.get("target_bracket"),
            target_before=d.get("target_before"),
            initial_loss=d.get("initial_loss"),
            history=[(int(s), dict(v)) for s, v in d["history"]],
            gns_every=d.get("gns_every"),
            counted=float(d.get("counted", 0.0)),
        )


class Checkpointer:
    def __init__(self, policy: CheckpointPolicy) -> None:
        self.policy = policy
        self._last_step = 0
        self._last_time = time.monotonic()

    def due(self, step: int) -> bool:
        p = self.policy
        if p.every_steps is not None and step - self._last_step >= p.every_steps:
            return True
        return p.every_seconds is not None and time.monotonic() - self._last_time >= p.every_seconds

    def save(self, objects: dict[str, Any], state: RunState) -> None:
        payload = {
            "format": FORMAT_VERSION,
            "objects": {k: v.state_dict() for k, v in objects.items()},
            "state": state.to_dict(),
            "rng": _rng_state(),
        }
        path = self.policy.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint or the new one
        self._last_step, self._last_time = state.step, time.monotonic()

    def mark(self, step: int) -> None:
        self._last_step, self._last_time = step, time.monotonic()


def load(path: Path, objects: dict[str, Any], device: torch.device) -> RunState:
    """Restore `objects` (anything with load_state_dict) and the RNGs; return the loop state."""
    payload = torch.load(path, map_location=device, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {payload.get('format')!r}, expected {FORMAT_VERSION}.")
    for name, obj in objects.items():
        obj.load_state_dict(payload["objects"][name])
    _set_rng_state(payload["rng"])
    return RunState.from_dict(payload["state"])


def export_weights(checkpoint: Path, dest: Path) -> None:
    """Write the model's state_dict alone (CPU tensors, `torch.load`-able) from a run's checkpoint."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {checkpoint} has format {payload.get('format')!r}, expected {FORMAT_VERSION}.")
    torch.save(payload["objects"]["model"], dest)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x
