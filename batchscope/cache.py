"""batchscope's cache folder, shared by the recipes' data and the sweeps' template MLflow store."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$BATCHSCOPE_CACHE, else $XDG_CACHE_HOME/batchscope, else ~/.cache/batchscope."""
    root = os.environ.get("BATCHSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "batchscope"
    )
    return Path(root)
