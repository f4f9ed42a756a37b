"""File names made from study names, which are user text: never a path of their own."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 60


def safe_name(name: str) -> str:
    """A file-system-safe, collision-resistant folder/file stem for a study name.

    Keeps letters, digits, ``.``, ``_`` and ``-``; anything else (slashes, ``..`` at the start,
    markup) is replaced. When the name had to change, a short hash of the original is appended
    so that "a/b" and "a_b" do not land in the same folder.
    """
    stem = _UNSAFE.sub("-", name).strip(".-_")[:_MAX_STEM] or "study"
    if stem == name:
        return stem
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{digest}"


def child_dir(out_dir: Path, name: str) -> Path:
    """`out_dir/<safe_name(name)>`, checked to stay inside `out_dir`."""
    root = out_dir.resolve()
    path = (root / safe_name(name)).resolve()
    if path.parent != root:
        raise ValueError(f"Report folder escapes out_dir: {name=} -> {path}")
    return path
