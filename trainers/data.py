"""Where training and evaluation batches come from, for each form of task (trainers/task.py).

A `Task`'s tensors already live on the device: `DeviceBatcher` draws index batches there,
without a host sync (the fast path). A `DataTask`'s data streams from the host: a Dataset
through a DataLoader with a seeded, checkpointable batch sampler (`LoaderBatches`), or a
recipe's factory of batches (`StreamBatches`). Either way a batch reaches the loop on the
device, this process's share of the global batch, in an order fixed by the seed.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from batchscope.trainers.batches import batch_size_of, slice_batch, to_device
from batchscope.trainers.task import BatchFactory, DataTask, Task


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
        # Every training step draws here: int arithmetic, the length read as shape[0] (len() of a
        # Tensor is a Python-level method), the refill out of line.
        pos = self._pos
        end = pos + self.batch_size
        if end > self._perm.shape[0]:
            self._refill()
            pos, end = 0, self.batch_size
        self._pos = end
        return self._perm[pos:end]

    def _refill(self) -> None:
        """The rest of the current epoch followed by as many new ones as the next batch needs."""
        parts = [self._perm[self._pos :]]
        have = self._perm.shape[0] - self._pos
        while have < self.batch_size:
            parts.append(self._new_epoch())
            have += self.n
        self._perm = torch.cat(parts)
        self._pos = 0

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


# ---- data that streams from the host: a Dataset or a factory of batches --------------------


def default_workers(device: torch.device) -> int:
    """DataLoader workers when the recipe does not say: none on the CPU, where workers would
    take cores from training; on CUDA, enough to keep decoding off the training process's
    critical path without crowding the host: 4 per process, fewer where the host's cores,
    shared by torchrun's processes on it (LOCAL_WORLD_SIZE), are fewer."""
    if device.type != "cuda":
        return 0
    per_process = ((os.cpu_count() or 2) - 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_process))


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for `epoch` of a run seeded `seed`: distinct per (seed, epoch), the same on every rank."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class GlobalBatchSampler:
    """Global batches of `batch_size` indices from shuffled epochs of `n` examples, this rank's `shard` of each.

    The order depends on the seed alone: epoch e is a permutation seeded with
    `epoch_seed(seed, e)`, and batch k covers positions [k·B, (k+1)·B) of the epochs laid end to
    end (a batch larger than the dataset spans epochs, as `DeviceBatcher`). So a run resumed at
    batch k starts its sampler at k (`start`), and with W processes each takes its 1/W slice of
    the same global batch (what DistributedSampler does per epoch, here per batch), so that
    the effective batch is the one a single process would draw. Infinite: the loop stops it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shard: slice | None = None, start: int = 0) -> None:
        if n < 1:
            raise ValueError(f"the training Dataset is empty (n={n}); it needs at least one example.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size=}.")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shard = shard if shard is not None else slice(None)
        self.start = start

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start * self.batch_size, self.n)
        perm = self._perm(epoch)
        while True:
            parts, need = [], self.batch_size
            while need:
                take = min(need, self.n - offset)
                parts.append(perm[offset : offset + take])
                need, offset = need - take, offset + take
                if offset == self.n:
                    epoch, offset = epoch + 1, 0
                    perm = self._perm(epoch)
            yield torch.cat(parts)[self.shard].tolist()


class LoaderBatches:
    """This rank's share of each global batch of a Dataset, through a DataLoader, on the device.

    Checkpointed as the number of batches the loop has taken (not the loader's position, which
    runs ahead by its prefetch): a resumed run reopens the loader at that batch.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        batch_size: int,
        seed: int,
        shard: slice,
        device: torch.device,
        num_workers: int,
    ) -> None:
        self.dataset, self.collate_fn, self.seed = dataset, collate_fn, seed
        self.batch_size, self.shard, self.device = batch_size, shard, device
        self.local = len(range(batch_size)[shard])
        self.num_workers = num_workers
        # Pinned host memory makes the copy to the GPU asynchronous (non_blocking below).
        self.pin = device.type == "cuda"
        self.drawn = 0
        self._it: Iterator[Any] | None = None

    def _open(self) -> Iterator[Any]:
        sampler = GlobalBatchSampler(len(self.dataset), self.batch_size, self.seed, self.shard, start=self.drawn)  # type: ignore[arg-type]
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin,
            # Workers' own random streams (augmentation) follow the seed and the position.
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.drawn)),
        )
        return iter(loader)

    def next(self) -> Any:
        if self._it is None:
            self._it = self._open()
        batch = to_device(next(self._it), self.device, non_blocking=self.pin)
        self.drawn += 1
        return checked(batch, self.local, "the training Dataset's collate function")

    def state_dict(self) -> dict[str, object]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.drawn = int(state["drawn"])  # type: ignore[call-overload]
        self._it = None  # reopened at the restored position by the next `next()`


class EmptyEpochError(ValueError):
    """A factory's epoch held no batch of the size asked for: its data is smaller than one batch."""


class StreamBatches:
    """Batches from a recipe's factory `(batch_size, seed) -> iterable`, one epoch per call.

    Epoch e is `factory(B, epoch_seed(seed, e))`. A stream cannot seek: a resumed run calls the
    factory for the saved epoch and skips the batches already taken (reading them again). Data
    parallel, every process reads the global batch and keeps its own slice.
    """

    def __init__(self, factory: BatchFactory, batch_size: int, seed: int, shard: slice, device: torch.device) -> None:
        self.factory, self.batch_size, self.seed = factory, batch_size, seed
        self.shard, self.device = shard, device
        self.non_blocking = device.type == "cuda"
        self.epoch = self.in_epoch = 0
        self._it: Iterator[Any] | None = None

    def _open(self) -> Iterator[Any]:
        it = iter(self.factory(self.batch_size, epoch_seed(self.seed, self.epoch)))
        for _ in range(self.in_epoch):  # resume: replay the epoch up to the saved batch
            next(it)
        return it

    def next(self) -> Any:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it, None)
        if batch is None:
            if self.in_epoch == 0:
                raise EmptyEpochError(f"the training factory yielded no batch for batch_size {self.batch_size}.")
            self.epoch, self.in_epoch = self.epoch + 1, 0
            self._it = self._open()
            return self.next()
        self.in_epoch += 1
        checked(batch, self.batch_size, "the training factory")
        if self.shard != slice(None):
            lo, hi, _ = self.shard.indices(self.batch_size)
            batch = slice_batch(batch, lo, hi)
        return to_device(batch, self.device, non_blocking=self.non_blocking)

    def state_dict(self) -> dict[str, object]:
        return {"epoch": self.epoch, "in_epoch": self.in_epoch}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.epoch = int(state["epoch"])  # type: ignore[call-overload]
        self.in_epoch = int(state["in_epoch"])  # type: ignore[call-overload]
        self._it = None


def checked(batch: Any, expected: int, source: str) -> Any:
    """The batch, if it holds `expected` examples (shapes only: no host sync)."""
    n = batch_size_of(batch)
    if n != expected:
        raise ValueError(
            f"{source} gave a batch of {n} examples where {expected} were asked for; give full batches "
            "(drop the last partial one, drop_last=True)."
        )
    return batch


class TensorBatches:
    """The fast path: (x, y) batches indexed from a `Task`'s tensors on the device (`DeviceBatcher`)."""

    def __init__(self, task: Task, batch_size: int, seed: int, shard: slice, device: torch.device) -> None:
        self.task, self.shard, self.sharded = task, shard, shard != slice(None)
        self.batcher = DeviceBatcher(task.num_train, batch_size, device, seed=seed)
        self._x, self._y = task.train_x, task.train_y

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Every training step draws here, where a Python call costs about a microsecond at batch 16
        # on the CPU: `DeviceBatcher.next`'s common case inline, its refill through it.
        b = self.batcher
        pos = b._pos
        end = pos + b.batch_size
        if end <= b._perm.shape[0]:
            b._pos = end
            idx = b._perm[pos:end]
        else:
            idx = b.next()
        if self.sharded:
            idx = idx[self.shard]
        return self._x[idx], self._y[idx]

    def state_dict(self) -> dict[str, object]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.batcher.load_state_dict(state)


BatchSource = TensorBatches | LoaderBatches | StreamBatches


def train_batches(
    task: Task | DataTask,
    batch_size: int,
    seed: int,
    shard: slice,
    device: torch.device,
    *,
    num_workers: int | None = None,
) -> BatchSource:
    """Where the loop draws its training batches from, for any form of task.

    `num_workers` overrides the task's DataLoader workers (AutoBatch's probes load in-process:
    a few batches each, where starting workers would cost more than it saves)."""
    if isinstance(task, Task):
        return TensorBatches(task, batch_size, seed, shard, device)
    if task.streams:
        return StreamBatches(task.train, batch_size, seed, shard, device)  # type: ignore[arg-type]
    workers = num_workers if num_workers is not None else task.num_workers
    workers = workers if workers is not None else default_workers(device)
    return LoaderBatches(task.train, task.collate_fn, batch_size, seed, shard, device, workers)  # type: ignore[arg-type]


# ---- evaluation batches ---------------------------------------------------------------------

EVAL_CHUNK = 4096  # rows of an in-memory Task per evaluation forward pass


def val_batches(task: Task | DataTask, device: torch.device) -> Iterator[Any]:
    """The validation set in batches on the device, in a fixed order."""
    if isinstance(task, Task):
        yield from _chunks(task.val_x, task.val_y)
    elif isinstance(task.val, Dataset):
        yield from _loader_batches(task, task.val, device)
    else:
        for batch in task.val():
            yield to_device(batch, device, non_blocking=device.type == "cuda")


def train_subset_batches(task: Task | DataTask, n: int, device: torch.device) -> Iterator[Any]:
    """A fixed subset of `n` training examples (the same in every run), in batches on the device.

    For end-of-run training metrics and sharpness: a random subset of a Dataset, the first
    `n` examples of a stream's epoch for seed 1234.
    """
    gen = torch.Generator().manual_seed(1234)
    if isinstance(task, Task):
        subset = torch.randperm(task.num_train, generator=gen)[:n].to(device)
        yield from _chunks(task.train_x[subset], task.train_y[subset])
    elif not task.streams:
        dataset: Dataset[Any] = task.train  # type: ignore[assignment]
        indices = torch.randperm(len(dataset), generator=gen)[:n].tolist()  # type: ignore[arg-type]
        yield from _loader_batches(task, Subset(dataset, indices), device)
    else:
        left = n
        for batch in task.train(task.eval_batch_size, 1234):  # type: ignore[operator]
            k = min(left, batch_size_of(batch))
            yield to_device(slice_batch(batch, 0, k), device, non_blocking=device.type == "cuda")
            left -= k
            if left <= 0:
                return


def _chunks(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for lo in range(0, len(x), EVAL_CHUNK):
        yield x[lo : lo + EVAL_CHUNK], y[lo : lo + EVAL_CHUNK]


# The validation loader of each Dataset, kept between evaluations: its workers persist rather
# than start again (a process each) at every evaluation point.
_EVAL_LOADERS: weakref.WeakKeyDictionary[Dataset[Any], DataLoader[Any]] = weakref.WeakKeyDictionary()


def _loader_batches(task: DataTask, dataset: Dataset[Any], device: torch.device) -> Iterator[Any]:
    pin = device.type == "cuda"
    loader = _EVAL_LOADERS.get(dataset)
    if loader is None:
        workers = task.num_workers if task.num_workers is not None else default_workers(device)
        loader = DataLoader(
            dataset,
            batch_size=task.eval_batch_size,
            collate_fn=task.collate_fn,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
        )
        _EVAL_LOADERS[dataset] = loader
    for batch in loader:
        yield to_device(batch, device, non_blocking=pin)
