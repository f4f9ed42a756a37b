"""Bad input: one line naming the field and the bad value, exit code 2, nothing created."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchscope.sweeps.cli import main
from tests.conftest import small_config, write_config

# Loose: the errors come in well under a second, but this machine may be busy.
TIME_BOUND_S = 30


def _bad(**kw: object) -> dict:
    return small_config(**kw)


def _at(*pairs: tuple[str, object]) -> dict:
    """small_config with values set at dotted paths (`("search.lr.high", inf)`); None deletes the key."""
    cfg = copy.deepcopy(small_config())
    for dotted, value in pairs:
        *sections, key = dotted.split(".")
        node = cfg
        for name in sections:
            node = node.setdefault(name, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return cfg


def _refused_in_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command in-process; assert exit code 2, one line, no traceback, nothing created, fast."""
    before = set(workdir.iterdir())
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert set(workdir.iterdir()) == before  # nothing created: no mlruns/, no reports/
    assert elapsed < TIME_BOUND_S
    return err


CASES = [
    # (name, config dict or raw text, expected fragments of the message)
    ("unknown key", {**small_config(), "trainz": {}}, ["trainz", "unknown key"]),
    ("unknown nested key", _bad(train__max_step=10), ["train.max_step", "unknown key"]),
    ("wrong type", _bad(train__max_steps="ten"), ["train.max_steps", "'ten'"]),
    ("batch size zero", _bad(search__batch_size={"values": [0, 16]}), ["search.batch_size", "0"]),
    ("negative batch", _bad(search__batch_size={"low": -4, "high": 16}), ["search.batch_size.low", "-4"]),
    ("lr low > high", _bad(search__lr={"low": 1.0, "high": 0.1}), ["search.lr", "low"]),
    ("unknown recipe", _bad(trainer={"recipe": "imagenet", "model": "mlp"}), ["trainer", "imagenet"]),
    ("unknown model", _bad(trainer={"recipe": "mnist1d", "model": "vit"}), ["trainer", "vit"]),
    ("unknown recipe option", _bad(trainer={"recipe": "mnist1d", "model": "mlp", "depth": 3}), ["trainer.depth"]),
    ("unknown optimizer", _bad(train__optimizer="lamb"), ["train.optimizer", "lamb"]),
    ("unknown sampler", _bad(search__sampler="cmaes"), ["search.sampler", "cmaes"]),
    ("unknown pruner", _bad(search__pruner="asha"), ["search.pruner", "asha"]),
    ("n_trials zero", _bad(search__n_trials=0), ["search.n_trials", "0"]),
    ("objective_evals zero", _bad(search__objective_evals=0), ["search.objective_evals", "0"]),
    ("target metric not produced", _bad(train__target={"metric": "val/bleu", "value": 1}), ["val/bleu"]),
    ("two budgets", _bad(train__max_samples=1000), ["max_steps", "max_samples"]),
    ("bad device", _bad(device="tpu"), ["device", "tpu"]),
    ("missing study", {k: v for k, v in small_config().items() if k != "study"}, ["study", "required"]),
    # Non-finite numbers, wherever a number is read.
    ("lr high inf", _at(("search.lr.high", math.inf)), ["search.lr.high", "finite"]),
    ("lr low nan", _at(("search.lr.low", math.nan)), ["search.lr.low", "finite"]),
    ("lr values inf", _at(("search.lr", {"values": [0.1, math.inf]})), ["search.lr.values", "finite"]),
    ("max_epochs inf", _at(("train.max_steps", None), ("train.max_epochs", math.inf)), ["train.max_epochs", "finite"]),
    ("target nan", _at(("train.target.value", math.nan)), ["train.target.value", "finite"]),
    ("target inf", _at(("train.target.value", math.inf)), ["train.target.value", "finite"]),
    ("weight decay inf", _at(("train.weight_decay", math.inf)), ["train.weight_decay", "finite"]),
    ("momentum nan", _at(("train.momentum", math.nan)), ["train.momentum", "finite"]),
    ("divergence inf", _at(("train.divergence_factor", math.inf)), ["train.divergence_factor", "finite"]),
    ("gns overhead nan", _at(("train.gns", {"max_overhead": math.nan})), ["train.gns.max_overhead", "finite"]),
    ("sharpness tol inf", _at(("train.sharpness.tol", math.inf)), ["train.sharpness.tol", "finite"]),
    ("memory limit inf", _at(("train.memory_limit_mb", math.inf)), ["train.memory_limit_mb", "finite"]),
    ("memory limit tiny", _at(("train.memory_limit_mb", 1e-9)), ["train.memory_limit_mb", "64"]),
    ("memory limit huge", _at(("train.memory_limit_mb", 1e15)), ["train.memory_limit_mb", "1073741824"]),
    ("checkpoint minutes inf", _at(("train.checkpoint", {"every_minutes": math.inf})), ["every_minutes", "finite"]),
    # Seeds: numpy's range.
    ("search seed -1", _at(("search.seed", -1)), ["search.seed", "2**32 - 1", "-1"]),
    ("search seed 2**64", _at(("search.seed", 2**64)), ["search.seed", "2**32 - 1", str(2**64)]),
    ("train seed -1", _at(("train.seeds", [0, -1])), ["train.seeds.1", "2**32 - 1"]),
    ("train seed 2**32", _at(("train.seeds", [2**32])), ["train.seeds.0", "2**32 - 1"]),
    # Budgets and batch sizes beyond what a config can mean.
    ("max_steps 10**15", _at(("train.max_steps", 10**15)), ["train.max_steps", "1000000000"]),
    (
        "max_samples 10**15 steps",
        _at(("train.max_steps", None), ("train.max_samples", 10**16)),
        ["train.max_samples", "batch size 16", "1,000,000,000 steps"],
    ),
    ("max_epochs 10**7", _at(("train.max_steps", None), ("train.max_epochs", 10**7)), ["train.max_epochs", "1000000"]),
    ("batch 10**12", _at(("search.batch_size", {"values": [16, 10**12]})), ["search.batch_size", "16777216"]),
    (
        "batch range 2**40",
        _at(("search.batch_size", {"low": 16, "high": 2**40})),
        ["search.batch_size.high", "16777216"],
    ),
    ("micro batch 10**12", _at(("train.micro_batch_size", 10**12)), ["train.micro_batch_size", "16777216"]),
    # 1200 samples × 0.8 = 960 training examples: a batch of 2**20 repeats each over 1024 times.
    ("batch past the data", _at(("search.batch_size", {"values": [16, 2**20]})), ["search.batch_size", "983,040"]),
    ("train batch past the data", _at(("train.batch_size", 2**20)), ["train.batch_size", "983,040"]),
    ("no training examples", _at(("trainer.train_split", 1e-4)), ["trainer", "no training examples"]),
    ("n_trials 10**12", _at(("search.n_trials", 10**12)), ["search.n_trials", "1000000"]),
    ("grid points 10**9", _at(("search.lr.grid_points", 10**9)), ["search.lr.grid_points", "1000"]),
    ("sharpness iters 10**12", _at(("train.sharpness.iters", 10**12)), ["train.sharpness.iters", "10000"]),
    ("warmup 10**15", _at(("train.lr_scaling", {"warmup_steps": 10**15})), ["warmup_steps", "1000000000"]),
    ("gns every 0", _at(("train.gns", {"every": 0})), ["train.gns.every", "'auto'"]),
    # Other slips.
    ("eval_every negative", _at(("train.eval_every", -5)), ["train.eval_every", "-5"]),
    ("log_every zero", _at(("train.log_every", 0)), ["train.log_every", "0"]),
    ("empty batch list", _at(("search.batch_size", {"values": []})), ["search.batch_size.values", "at least 1"]),
    ("lr as text", _at(("search.lr.low", "fast")), ["search.lr.low", "'fast'"]),
    ("repeated lr", _at(("search.lr", {"values": [0.1, 0.1]})), ["search.lr.values", "distinct"]),
    ("a thousand and one seeds", _at(("train.seeds", list(range(1001)))), ["train.seeds", "at most 1000"]),
    (
        "three objectives",
        _at(("search.objective", ["val_loss", "val_acc", "steps_to_target"])),
        ["search.objective", "at most 2", "or one of 'val_loss'"],
    ),
    ("empty report folder", _at(("report.out_dir", "")), ["report.out_dir"]),
]


@pytest.mark.parametrize(("name", "cfg", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_clear_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], name: str, cfg: dict, fragments: list[str]
) -> None:
    path = write_config(workdir / "bad.yaml", cfg)
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_full_batch_and_a_grid_past_the_training_set_are_allowed() -> None:
    from batchscope.sweeps.config_load import validate

    # 960 training examples: the whole set, and the power of two above it (the batch spans two epochs).
    cfg = validate(_at(("search.batch_size", {"values": [16, 960, 1024]})), "x")
    assert cfg.searched_batch_sizes() == [16, 960, 1024]


def _cuda_devices() -> int:
    from batchscope.sweeps.devices import cuda_device_count

    return cuda_device_count()


def test_cuda_without_a_cuda_device_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if _cuda_devices():
        pytest.skip("this machine has a CUDA device")
    path = write_config(workdir / "bad.yaml", _at(("device", "cuda")))
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    assert "no CUDA device" in err and "auto or cpu" in err


def test_a_cuda_index_past_the_devices_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = _cuda_devices()
    path = write_config(workdir / "bad.yaml", _at(("device", f"cuda:{n}")))
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    assert f"cuda:{n}" in err
    assert ("no CUDA device" in err) if n == 0 else (f"{n} CUDA device(s)" in err)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("study: a\nsearch: {n_trials: 2}\nstudy: b\n", ["'study'", "lines 1 and 3"]),
        ("study: a\ntrain:\n  max_steps: 5\n  eval_every: 5\n  max_steps: 6\n", ["'max_steps'", "lines 3 and 5"]),
        ("study: a\nsearch: {n_trials: " + "9" * 5000 + "}\n", ["bad YAML", "digits"]),
        ("study: a\nx: " + "[" * 100_000 + "]" * 100_000 + "\n", ["bad YAML", "nested too deeply"]),
        ("study: \x00\x01\n", ["binary"]),
    ],
    ids=["duplicate key", "duplicate nested key", "endless integer", "deep nesting", "binary"],
)
def test_bad_yaml_file_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], text: str, fragments: list[str]
) -> None:
    path = workdir / "bad.yaml"
    path.write_text(text)
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_a_merge_key_may_be_overridden(workdir: Path) -> None:
    from batchscope.sweeps.config_load import read_yaml

    # `<<:` then the same key is what YAML merge keys are for: not a duplicate.
    path = workdir / "merge.yaml"
    path.write_text("study: a\ntrain:\n  <<: {max_steps: 5, eval_every: 5}\n  max_steps: 6\n")
    assert read_yaml(path)["train"] == {"max_steps": 6, "eval_every": 5}


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("folder", "folder"),
        ("fifo", "not a regular file"),
        ("big", "bytes"),
        ("loop", "symbolic links"),
        ("long name", "too long"),
    ],
)
def test_a_config_path_that_is_not_a_config_file(
    workdir: Path, capsys: pytest.CaptureFixture[str], kind: str, fragment: str
) -> None:
    path = workdir / kind
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "big":
        path.write_text("study: a\n" + "#\n" * 600_000)
    elif kind == "loop":
        path.symlink_to(path)
    else:
        path = workdir / ("x" * 300 + ".yaml")
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    assert fragment in err, err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("study: [unclosed", "bad YAML"), ("", "empty"), ("- a\n- b\n", "mapping")],
)
def test_bad_yaml(workdir: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str) -> None:
    path = workdir / "bad.yaml"
    path.write_text(text)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert not (workdir / "mlruns").exists()


def test_missing_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not (workdir / "mlruns").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.maxsteps=3", "train.maxsteps"),
        ("nonsense", "KEY=VALUE"),
        ("search.batch_size.foo=1", "foo"),
        ("train.max_steps=-5", "train.max_steps"),
        ("search.lr.high=.inf", "search.lr.high"),
        ("train.target.value=.nan", "train.target.value"),
        ("search.seed=-1", "search.seed"),
        ("train.max_steps=1000000000000000", "train.max_steps"),
        ("search.batch_size={values: [1], values: [2]}", "'values' is given twice"),
        ("device=cuda:99", "cuda:99"),
    ],
)
def test_bad_override(workdir: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str) -> None:
    path = write_config(workdir / "ok.yaml", small_config())
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path), "--set", override])
    assert fragment in err, err


BIG = str(10**12)

COMMAND_LINE_CASES = [
    # (command and its arguments after the config, expected fragments of the message)
    (["train", "--lr", "inf"], ["--lr", "finite", "inf"]),
    (["train", "--lr", "nan"], ["--lr", "finite", "nan"]),
    (["train", "--lr", "abc"], ["--lr", "'abc'"]),
    (["train", "--seed", "-1"], ["--seed", "4,294,967,295"]),
    (["train", "--seed", str(2**64)], ["--seed", "4,294,967,295"]),
    (["train", "--batch-size", BIG], ["--batch-size", "16,777,216"]),
    (["train", "--batch-size", "0"], ["--batch-size", "0"]),
    (["train", "--batch-size", str(2**20)], ["--batch-size", "960 training examples", "983,040"]),
    (["sweep", "--workers", "0"], ["--workers", "between 1 and"]),
    (["sweep", "--workers", "100000"], ["--workers", "per CPU core"]),
    (["sweep", "--n-trials", "0"], ["--n-trials", "between 1 and"]),
    (["worker", "--workers", "0"], ["--workers", "between 1 and"]),
    (["autobatch", "--fraction", "nan"], ["--fraction", "at most 1"]),
    (["autobatch", "--budget-mb", "inf"], ["--budget-mb", "finite"]),
    (["autobatch", "--max-batch", BIG], ["--max-batch", "16,777,216"]),
    (["throughput", "--batch-sizes", f"1,{BIG}"], ["--batch-sizes", "16,777,216"]),
    (["throughput", "--iters", BIG], ["--iters", "1,000,000"]),
    (["noise-scale", "--seed", "-1"], ["--seed", "4,294,967,295"]),
    (["noise-scale", "--precision", "inf"], ["--precision", "finite"]),
    (["noise-scale", "--batches", "1"], ["--batches", "uncertainty"]),
]


@pytest.mark.parametrize(("args", "fragments"), COMMAND_LINE_CASES, ids=[" ".join(a) for a, _ in COMMAND_LINE_CASES])
def test_bad_command_line_number(
    workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragments: list[str]
) -> None:
    path = write_config(workdir / "ok.yaml", small_config())
    err = _refused_in_one_line(workdir, capsys, [args[0], str(path), *args[1:]])
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_real_process_exits_2_without_traceback(workdir: Path) -> None:
    path = write_config(workdir / "bad.yaml", _bad(train__max_steps=0))
    proc = subprocess.run(
        [sys.executable, "-m", "batchscope.sweeps.cli", "sweep", str(path)], capture_output=True, text=True, cwd=workdir
    )
    assert proc.returncode == 2
    assert "train.max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "text", "fragment"),
    [
        (["sweep", "bad.yaml"], "study: a\nsearch: {lr: {low: 0.01, high: .inf}}\n", "search.lr.high"),
        (["sweep", "bad.yaml"], "study: a\nstudy: b\n", "lines 1 and 2"),
        (["sweep", "bad.yaml", "--workers", "100000"], "study: a\n", "--workers"),
        (["train", "bad.yaml", "--batch-size", BIG], "study: a\n", "--batch-size"),
    ],
    ids=["inf", "duplicate key", "workers", "batch size"],
)
def test_real_process_refuses_in_one_line_and_creates_nothing(
    workdir: Path, argv: list[str], text: str, fragment: str
) -> None:
    (workdir / "bad.yaml").write_text(text)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "batchscope.sweeps.cli", *argv], capture_output=True, text=True, cwd=workdir
    )
    assert time.perf_counter() - start < TIME_BOUND_S
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert fragment in proc.stderr
    assert [p.name for p in workdir.iterdir()] == ["bad.yaml"]


def test_shipped_configs_validate() -> None:
    from batchscope.sweeps.config_load import load_config

    configs = sorted((Path(__file__).parents[2] / "sweeps" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_overrides_parse_yaml_values() -> None:
    from batchscope.sweeps.config_load import apply_overrides, validate

    raw = apply_overrides(small_config(), ["train.max_steps=300", "train.seeds=[0, 1]", "search.lr.low=1e-4"])
    cfg = validate(raw, "x")
    assert cfg.train.max_steps == 300
    assert cfg.train.seeds == [0, 1]
    assert cfg.search.lr.low == 1e-4  # type: ignore[union-attr]
