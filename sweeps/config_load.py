"""Reading a sweep config: its YAML file, `--set key=value` overrides, and validation errors in one line.

Every mistake is reported with the field's path and the bad value, before anything is created
on disk. The schema itself is sweeps.config.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from batchscope.sweeps.config import SweepConfig, TrainerConfig
from batchscope.sweeps.errors import UserError


def _off_the_mark(err: Mapping[str, Any]) -> bool:
    """A union member of another kind than the value given (a name, for a list of names): its
    error says least about what is wrong, so it comes after the others (a stable sort)."""
    kind_mismatch = err.get("type") == "literal_error" or str(err.get("type", "")).endswith("_type")
    return kind_mismatch and isinstance(err.get("input"), list | dict)


def _location(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
    # Pydantic names union members in the path (tags, types); drop those for readability.
    loc = re.sub(r"\.by-(values|range)(?=\.|$)", "", loc)
    return re.sub(r"\.(list\[.*?\]|str|int|float|literal\[.*?\]|constrained-\w+)(?=\.|$)", "", loc)


def _format_error(err: Mapping[str, Any]) -> str:
    loc = _location(err)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (check the spelling; see sweeps/configs/ for the keys)"
    elif "input" in err and err.get("type") not in ("missing",):
        value = err["input"]
        if not isinstance(value, dict | list | BaseModel) and len(repr(value)) < 80 and repr(value) not in msg:
            msg = f"{msg} (got {value!r})"
    return f"{loc}: {msg}" if loc else msg


def validate(raw: Any, source: str) -> SweepConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_one_line(exc.errors())}") from None


def _one_line(errors: Sequence[Mapping[str, Any]]) -> str:
    errors = sorted(errors, key=_off_the_mark)
    first = _format_error(errors[0])
    loc = _location(errors[0])
    # A union (`every: 10 | auto`) gives one error per member at the same place: say the alternatives.
    alternatives = [e for e in errors[1:] if _location(e) == loc and e.get("type") == "literal_error"]
    if alternatives and len(alternatives) == len(errors) - 1:
        names = [str(e["msg"]).removeprefix("Input should be ") for e in alternatives]
        return first + "".join(f", or {'one of ' if ' or ' in n else ''}{n}" for n in names)
    return first + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Hashable, first_line: int, second_line: int) -> None:
        super().__init__(f"the key {key!r} is given twice, on lines {first_line} and {second_line}; keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one without a word: `study:` twice silently renames the study)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is what merge keys are for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise _DuplicateKey(key, seen[key], line)
            if isinstance(key, Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except (ValueError, RecursionError) as exc:
        # Not YAMLError: an integer of thousands of digits (Python's int() limit), or nesting deeper
        # than the recursion limit. Neither is a sweep config.
        problem = str(exc).split(";")[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise yaml.YAMLError(problem) from None


# A sweep config is a page of YAML; a bigger file is the wrong file (a dataset, a checkpoint).
_MAX_CONFIG_BYTES = 1_000_000


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise UserError(
            f"config file {str(p)!r} does not exist; give the path to a sweep YAML (see sweeps/configs/)"
        ) from None
    except OSError as exc:  # a name too long, a symlink loop, a folder we may not enter
        raise UserError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"config {str(p)!r} is a folder; give the path to a sweep YAML file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or a device (/dev/zero) would block or never end.
        raise UserError(f"config {str(p)!r} is not a regular file; give the path to a sweep YAML file")
    try:
        size = info.st_size
        if size > _MAX_CONFIG_BYTES:
            raise UserError(
                f"config file {str(p)!r} is {size:,} bytes, not a sweep config (at most {_MAX_CONFIG_BYTES:,})"
            )
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {str(p)!r} cannot be read: {exc}") from None
    if "\x00" in text:
        raise UserError(f"config file {str(p)!r} is binary, not YAML; give the path to a sweep YAML file")
    try:
        raw = _parse_yaml(text)
    except _DuplicateKey as exc:
        raise UserError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc) or "invalid YAML"
        raise UserError(f"{p}: bad YAML{where}: {problem}") from None
    if raw is None:
        raise UserError(f"{p}: the file is empty; a sweep config needs at least `study:`")
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`300`, `[0, 1]`, `true`)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=300")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise UserError(f"--set {item!r}: the key {key!r} is not a dotted path like train.max_steps")
        _check_key_exists(parts, item)
        try:
            value = _parse_yaml(text) if text.strip() else None
        except _DuplicateKey as exc:
            raise UserError(f"--set {item!r}: {exc}") from None
        except yaml.YAMLError:
            value = text
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def _check_key_exists(parts: list[str], item: str) -> None:
    """Refuse `--set` keys the schema does not have (trainer options are checked by the recipe)."""
    model: Any = SweepConfig
    for i, p in enumerate(parts):
        if model is TrainerConfig and p not in TrainerConfig.model_fields:
            return  # recipe option, validated with the whole config
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return  # inside a free-form value (a list or a union member's fields)
        if p not in fields:
            path = ".".join(parts[: i + 1])
            raise UserError(
                f"--set {item!r}: there is no config key {path!r}; known keys here: {', '.join(sorted(fields))}"
            )
        annotation = fields[p].annotation
        model = _model_of(annotation)
        if model is None:
            if i < len(parts) - 1:
                # A union of models (batch_size: values | low/high) or a plain value: allow any sub-key of a member.
                members = _union_models(annotation)
                if members:
                    sub = parts[i + 1]
                    if not any(sub in m.model_fields for m in members):
                        keys = sorted({k for m in members for k in m.model_fields})
                        raise UserError(
                            f"--set {item!r}: there is no config key {'.'.join(parts[: i + 2])!r}; "
                            f"known keys here: {', '.join(keys)}"
                        )
                    return
                raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            return


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = _union_models(annotation)
    # `Target | None`: one model in a union with None.
    if len(members) == 1 and type(None) in getattr(annotation, "__args__", ()):
        return members[0]
    return None


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    args = [_strip_annotated(a) for a in get_args(_strip_annotated(annotation))]
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, override and validate a sweep config; raises UserError with one clear line."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate(raw, str(path))
