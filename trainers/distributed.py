"""Data parallelism across processes started by torchrun: set-up and the few collectives the loop needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each
process; `init_from_env` joins the process group (NCCL on CUDA, gloo on CPU) and
returns the device this process trains on. The training loop asks `world()` once,
before its loop: a world of one (no process group) is plain single-process training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(device: str = "auto", *, timeout_s: float = 600.0) -> torch.device:
    """Join the process group described by torchrun's environment; the device to train on.

    `device` is the run's requested device: `cpu` trains on the CPU with gloo even
    where CUDA exists; otherwise CUDA (when available) means NCCL on cuda:LOCAL_RANK.
    """
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed training needs the torchrun environment; {', '.join(missing)} not set. "
            "Start it with `python -m torch.distributed.run --nproc_per_node N ...`."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} has no GPU: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs and writes checkpoints."""
    return rank() == 0


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all processes, in place, with one collective.

    The tensors are packed into one flat fp32 buffer: one all-reduce however many
    parameters there are (what DDP's gradient buckets do, in one bucket).
    """
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_bool(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag`, on every process (a host sync: call at logging points only)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's `value`, on every process (a host sync)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process, so all start from the same weights."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)
