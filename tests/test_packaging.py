"""batchscope installed as users get it: one namespace, nothing named `analysis`, `sweeps` or `trainers`.

A wheel is built from this checkout and installed, without its dependencies, into a fresh
virtualenv outside the repository; the dependencies come from the test's own environment,
added to the new one's path by a .pth line (so nothing is downloaded, and the checkout's
editable install is not in play).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

import batchscope
from tests.conftest import small_config, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh virtualenv holding batchscope's wheel (not the checkout)."""
    base = tmp_path_factory.mktemp("packaging")
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        cwd=base,
    )
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    new_site = subprocess.run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies (torch, optuna, mlflow...) from this environment; a plain path line adds
    # no .pth processing, so the checkout's editable finder stays out.
    Path(new_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("batchscope-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", new_site, str(wheel)],
        check=True,
        capture_output=True,
    )
    # The console script, as pip would write it into the venv's bin.
    script = bin_dir / "batchscope"
    script.write_text(
        f"#!{bin_dir / 'python'}\nimport sys\nfrom batchscope.sweeps.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return bin_dir


def _python(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_one_namespace_and_one_version(installed: Path, tmp_path: Path) -> None:
    got = _python(
        installed,
        "import batchscope, batchscope.sweeps.cli, batchscope.analysis, batchscope.trainers.loop\n"
        "import importlib.metadata as md\n"
        "print(batchscope.__version__, md.version('batchscope'), batchscope.sweeps.cli.__file__)",
        tmp_path,
    )
    assert got.returncode == 0, got.stderr
    version, meta, cli_file = got.stdout.split()
    assert version == meta == batchscope.__version__
    assert "site-packages" in cli_file and str(REPO) not in cli_file  # the wheel, not the checkout
    for name in ("analysis", "sweeps", "trainers"):
        refused = _python(installed, f"import {name}", tmp_path)
        assert refused.returncode == 1 and f"No module named '{name}'" in refused.stderr, (name, refused.stderr)
    shown = subprocess.run([str(installed / "batchscope"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.stdout.strip() == f"batchscope {batchscope.__version__}", shown


def test_a_users_own_analysis_module_does_not_break_a_sweep_or_its_report(installed: Path, tmp_path: Path) -> None:
    """Files named like batchscope's old top-level packages, in the folder a user runs from."""
    for name in ("analysis", "sweeps", "trainers"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    cfg = small_config("mine")
    cfg["train"].update({"max_steps": 20, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["n_trials"] = 2
    config = write_config(tmp_path / "mine.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["BATCHSCOPE_ROOT"] = str(tmp_path / "mlruns")
    swept = subprocess.run(
        [str(installed / "batchscope"), "sweep", str(config)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "was imported" not in swept.stdout + swept.stderr
    # What a log file of the sweep shows (no terminal): a line per trial (the terminal's transient
    # "starting ..." status is not written to a file).
    assert "starting" not in swept.stderr, swept.stderr
    lines = re.findall(r"\d\d:\d\d:\d\d trial \d bs=\d+ lr=[\d.]+: ok → [\d.]+ in [\d.]+ s · (\d)/2", swept.stderr)
    assert lines == ["1", "2"], swept.stderr
    reported = subprocess.run(
        [str(installed / "batchscope"), "report", "mine"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert len(list(tmp_path.rglob("mine/index.html"))) == 1, reported.stdout


def test_the_source_folders_are_the_installed_subpackages() -> None:
    """In the checkout, batchscope/<name> links to the top-level folder users edit."""
    import batchscope.analysis
    import batchscope.sweeps
    import batchscope.trainers

    for module, folder in (
        (batchscope.sweeps, "sweeps"),
        (batchscope.trainers, "trainers"),
        (batchscope.analysis, "analysis"),
    ):
        assert Path(module.__file__ or "").resolve().parent == REPO / folder
    script = textwrap.dedent("import batchscope; print(batchscope.__version__)")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/").returncode == 0
