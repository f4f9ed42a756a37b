"""docs/python.md's code, as the tests run it: its ```python blocks, in order."""

from __future__ import annotations

import os
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "python.md"
STUDY = "walkthrough"  # the study the walk-through sweeps


def code_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert blocks, f"no ```python blocks in {DOC}"
    return blocks


def environment(tmp: Path) -> dict[str, str]:
    """The environment the walk-through runs in: temporary files under `tmp` (so that what it
    leaves in the working folder can be checked), one thread per process (a busy 2-core machine),
    and no BATCHSCOPE_ROOT: the walk-through names its store folder with root=."""
    env = {k: v for k, v in os.environ.items() if k != "BATCHSCOPE_ROOT"}
    env.update(TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def work_folder(output: str) -> Path:
    """The temporary folder the walk-through printed that it writes under."""
    match = re.search(r"^writing under (\S+)$", output, flags=re.M)
    assert match, f"the walk-through did not say where it writes:\n{output[-2000:]}"
    return Path(match.group(1))
