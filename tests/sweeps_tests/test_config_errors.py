"""Bad input: one line naming the field and the bad value, exit code 2, nothing created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.cli import main
from tests.conftest import small_config, write_config


def _bad(**kw: object) -> dict:
    return small_config(**kw)


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
]


@pytest.mark.parametrize(("name", "cfg", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_clear_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], name: str, cfg: dict, fragments: list[str]
) -> None:
    path = write_config(workdir / "bad.yaml", cfg)
    code = main(["sweep", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (workdir / "mlruns").exists()  # nothing created


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
    ],
)
def test_bad_override(workdir: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str) -> None:
    path = write_config(workdir / "ok.yaml", small_config())
    assert main(["sweep", str(path), "--set", override]) == 2
    assert fragment in capsys.readouterr().err
    assert not (workdir / "mlruns").exists()


def test_real_process_exits_2_without_traceback(workdir: Path) -> None:
    path = write_config(workdir / "bad.yaml", _bad(train__max_steps=0))
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "sweep", str(path)], capture_output=True, text=True, cwd=workdir
    )
    assert proc.returncode == 2
    assert "train.max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_configs_validate() -> None:
    from sweeps.config import load_config

    configs = sorted((Path(__file__).parents[2] / "sweeps" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_overrides_parse_yaml_values() -> None:
    from sweeps.config import apply_overrides, validate

    raw = apply_overrides(small_config(), ["train.max_steps=300", "train.seeds=[0, 1]", "search.lr.low=1e-4"])
    cfg = validate(raw, "x")
    assert cfg.train.max_steps == 300
    assert cfg.train.seeds == [0, 1]
    assert cfg.search.lr.low == 1e-4  # type: ignore[union-attr]
