"""Whether this machine has a CUDA (or ROCm) device, found out without importing torch where possible.

Configs are checked (sweeps.config) and trials planned (sweeps.specs) in the sweep process,
which never imports torch on a machine whose PyTorch has no GPU support.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path


@functools.cache
def torch_has_gpu_support() -> bool:
    """Whether the installed PyTorch was built with CUDA or ROCm, read from torch/version.py.

    Without either, torch.cuda.is_available() is False: a config that names no CUDA device is
    checked without importing torch (1–2 s of start-up).
    """
    found = importlib.util.find_spec("torch")
    locations = list(found.submodule_search_locations or []) if found is not None else []
    try:
        text = (Path(locations[0]) / "version.py").read_text(encoding="utf-8")
    except (IndexError, OSError, UnicodeDecodeError):
        return True  # cannot tell: ask torch itself
    builds = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.*?)\s*$", text, flags=re.MULTILINE))
    return builds.get("cuda") != "None" or builds.get("hip") != "None"


def cuda_device_count() -> int:
    """CUDA (or ROCm) devices on this machine; torch is imported only when its build has GPU support."""
    if not torch_has_gpu_support():
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def check_cuda(device: str) -> None:
    """A `cuda` or `cuda:N` device that this machine has; ValueError (for the config's validator) if not."""
    count = cuda_device_count()
    if count == 0:
        raise ValueError(f"{device!r}: there is no CUDA device on this machine; set device: auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(
            f"{device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
            "set device: cuda, cuda:N with N below that, or auto"
        )
