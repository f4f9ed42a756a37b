"""Batches drawn from tensors that already live on the training device."""

from __future__ import annotations

import torch


class DeviceBatcher:
    """Index batches of `batch_size` from shuffled epochs, without replacement within an epoch.

    Indices are generated on the device, so drawing a batch never synchronizes
    with the host. A batch larger than the dataset spans several epochs.
    """

    def __init__(self, num_examples: int, batch_size: int, device: torch.device, seed: int) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {num_examples=}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size=}.")
        self.n = num_examples
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long, device=device)
        self._pos = 0
        self.epochs_started = 0

    def _new_epoch(self) -> torch.Tensor:
        self.epochs_started += 1
        return torch.randperm(self.n, generator=self.generator, device=self.device)

    def next(self) -> torch.Tensor:
        remaining = len(self._perm) - self._pos
        if remaining < self.batch_size:
            parts = [self._perm[self._pos :]]
            have = remaining
            while have < self.batch_size:
                parts.append(self._new_epoch())
                have += self.n
            self._perm = torch.cat(parts)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, object]:
        return {
            "generator": self.generator.get_state(),
            "perm": self._perm.cpu(),
            "pos": self._pos,
            "epochs_started": self.epochs_started,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        gen_state = state["generator"]
        perm = state["perm"]
        assert isinstance(gen_state, torch.Tensor) and isinstance(perm, torch.Tensor)
        self.generator.set_state(gen_state)
        self._perm = perm.to(self.device)
        self._pos = int(state["pos"])  # type: ignore[call-overload]
        self.epochs_started = int(state["epochs_started"])  # type: ignore[call-overload]
