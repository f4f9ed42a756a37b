"""What the public API's functions share: the local store's folder, user errors, reading a config."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from batchscope.sweeps.errors import UserError

if TYPE_CHECKING:
    from batchscope.sweeps.config import SweepConfig

P = ParamSpec("P")
R = TypeVar("R")

ConfigLike = str | os.PathLike[str] | Mapping[str, Any]
Overrides = Mapping[str, Any] | Sequence[str] | None


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A UserError raised inside reaches the caller as its one line, without the frames of
    batchscope's internals below the API call: the mistake is the caller's to fix, and a deep
    traceback would only bury the line that says how."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise exc.with_traceback(None) from None

    return wrapper


@contextlib.contextmanager
def local_root(root: str | os.PathLike[str] | None) -> Iterator[None]:
    """Within: the local store folder is `root` (None: left as it is, $BATCHSCOPE_ROOT or ./mlruns).

    The CLI decides where the local store is from $BATCHSCOPE_ROOT (sweeps.store_setup.root_dir),
    read wherever a store is resolved, worker processes included (they inherit the
    environment): setting it for the call is how `root=` means exactly what the variable means.
    """
    if root is None:
        yield
        return
    if not isinstance(root, str | os.PathLike) or not str(root).strip():
        raise ValueError(f"root must be a folder path, but got {root=}.")
    old = os.environ.get("BATCHSCOPE_ROOT")
    os.environ["BATCHSCOPE_ROOT"] = str(Path(root).expanduser().absolute())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BATCHSCOPE_ROOT", None)
        else:
            os.environ["BATCHSCOPE_ROOT"] = old


def override_texts(overrides: Overrides) -> list[str]:
    """The CLI's `--set KEY=VALUE` texts for `overrides`: a mapping {"train.max_steps": 300}
    (values written as YAML, which is how `--set` reads them) or `KEY=VALUE` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={_yaml_text(value)}" for key, value in overrides.items()]
    if isinstance(overrides, Sequence) and all(isinstance(item, str) for item in overrides):
        return list(overrides)
    raise ValueError(
        f"overrides must be a mapping like {{'train.max_steps': 300}} or a list of 'key=value' strings, "
        f"but got {overrides=}."
    )


def _yaml_text(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=2**30).strip()
    return text.removesuffix("...").strip()  # a plain scalar's document-end marker


def read_config(config: ConfigLike, overrides: Overrides) -> SweepConfig:
    """A sweep config from a YAML path or a dict, with `overrides` applied and then validated as
    `batchscope sweep CONFIG --set ...` does; a mistake is one UserError line naming the key."""
    from batchscope.sweeps.config_load import apply_overrides, load_config, validate

    texts = override_texts(overrides)
    if isinstance(config, Mapping):
        return validate(apply_overrides(dict(config), texts), "config")
    if isinstance(config, str | os.PathLike):
        return load_config(os.fspath(config), texts)
    raise ValueError(f"config must be a path to a sweep YAML or a dict, but got {type(config).__name__}: {config!r}.")
