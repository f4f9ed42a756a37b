"""The report in a real browser: headless Chromium loads it, every chart decodes, the console stays clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from batchscope.analysis.load import load_sweep
from batchscope.analysis.report import render_report
from tests.analysis_tests.conftest import SCRIPT_NAME, Stores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (scripts/test.sh installs it with apt-get)"
)


def _open(page: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """Load the page headless; return the DOM after scripts ran, Chromium's log, and a screenshot."""
    assert CHROMIUM is not None
    shot = tmp_path / "report.png"
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot_run = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return dom.stdout, dom.stderr + shot_run.stderr, shot


def _console_errors(log: str) -> list[str]:
    lines = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return [line for line in lines if re.search(r"error|uncaught|failed", line, re.IGNORECASE)]


def test_report_loads_with_every_chart_and_a_clean_console(stores: Stores, tmp_path: Path) -> None:
    page = render_report(
        [load_sweep("main", storage=stores.storage, tracking_uri=stores.tracking_uri)], out_dir=tmp_path / "r"
    )
    dom, log, shot = _open(page, tmp_path)
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, "the report's load handler did not run"
    assert int(total.group(1)) >= 7  # the seven charts
    assert loaded.group(1) == total.group(1), "some chart did not decode"
    assert not _console_errors(log), _console_errors(log)
    assert shot.exists() and shot.stat().st_size > 20_000  # a real rendering, not a blank page


def test_a_script_in_the_study_name_shows_as_text(stores: Stores, tmp_path: Path) -> None:
    page = render_report(
        [load_sweep(SCRIPT_NAME, storage=stores.storage, tracking_uri=stores.tracking_uri)], out_dir=tmp_path / "r"
    )
    dom, log, _ = _open(page, tmp_path)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # rendered as text
    assert "<script>alert(1)</script>" not in dom
    assert "alert" not in "\n".join(line for line in log.splitlines() if "CONSOLE" in line)
