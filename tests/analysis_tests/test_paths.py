from __future__ import annotations

from pathlib import Path

import pytest

from batchscope.analysis.paths import child_dir, safe_name
from batchscope.analysis.readonly_stores import redact_url


@pytest.mark.parametrize(
    ("name", "expected_stem"),
    [
        ("main", "main"),  # safe names are kept as they are
        ("mnist1d-sgd_v2.1", "mnist1d-sgd_v2.1"),
        ("../../etc", "etc-"),
        ("x<script>alert(1)</script>", "x-script-alert-1-script-"),
        ("a/b", "a-b-"),
        ("", "study-"),
        ("..", "study-"),
        ("名前", "study-"),
    ],
)
def test_safe_name(name, expected_stem):
    result = safe_name(name)

    assert result.startswith(expected_stem)
    assert "/" not in result and "\\" not in result and not result.startswith(".")
    assert len(result) <= 70


def test_safe_names_of_different_studies_differ():
    assert safe_name("a/b") != safe_name("a_b") != safe_name("a-b")
    assert safe_name("a/b") != safe_name("a?b")


def test_child_dir_stays_inside(tmp_path: Path):
    for name in ("../../etc", "/etc/passwd", "..", "a/../../b"):
        assert child_dir(tmp_path, name).parent == tmp_path.resolve()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:s3cret@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow"),
        ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_redact_url_hides_passwords(url, shown):
    assert redact_url(url) == shown
