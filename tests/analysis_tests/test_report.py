"""The HTML/Markdown report, rebuilt from real stores."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from batchscope.analysis.analyze import analyze
from batchscope.analysis.charts import CHARTS as ALL_CHARTS
from batchscope.analysis.load import load_sweep
from batchscope.analysis.report import build_report, log_report_artifacts, render_report
from tests.analysis_tests.conftest import SCRIPT_NAME, TRAVERSAL_NAME, Stores, make_optuna_only_study

# Charts of optional data (inference throughput) appear only when that data exists.
CHARTS = [c for c in ALL_CHARTS if c.when is None]
IMG = re.compile(r'<img src="data:(image/[a-z+]+);base64,([^"]*)" alt="([^"]*)">')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(stores: Stores, name: str):
    return load_sweep(name, storage=stores.storage, tracking_uri=stores.tracking_uri)


@pytest.fixture(scope="module")
def main_report(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("reports")
    return render_report([_load(stores, "main")], out_dir=out_dir, strict=True)


@pytest.fixture(scope="module")
def comparison_report(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The script-named study next to a degenerate one: no run reached the target.
    sweeps = [_load(stores, name) for name in (SCRIPT_NAME, "no-target")]
    return render_report(sweeps, out_dir=tmp_path_factory.mktemp("reports"), strict=True)


def test_single_study_report_layout(main_report: Path):
    assert main_report.name == "index.html"
    assert main_report.parent.name == "main"
    assert (main_report.parent / "summary.md").is_file()
    assert sorted(p.stem for p in (main_report.parent / "charts").iterdir()) == sorted(c.name for c in CHARTS)


def test_every_chart_is_embedded_as_a_png(main_report: Path):
    page = main_report.read_text()
    images = IMG.findall(page)

    assert [html.unescape(alt) for _, _, alt in images] == [spec.title for spec in CHARTS]
    for mime, data, _ in images:
        assert mime == "image/png"
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_report_is_self_contained(main_report: Path):
    page = main_report.read_text()

    # Nothing to fetch: no external scripts, styles or images; a CSP that forbids them.
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=\"https?:", page)
    assert "<link" not in page
    assert "default-src 'none'" in page
    assert page.count("<script>") == 1


def test_findings_are_computed_from_the_data(main_report: Path):
    page = main_report.read_text()
    findings = re.search(r"<ul class='findings'>(.*?)</ul>", page, re.S)

    assert findings is not None
    text = findings.group(1)
    # The synthetic sweep has B_crit = 128 and lr* ∝ B^0.5.
    b_crit = re.search(r"critical batch size is about (\d+) examples", text)
    assert b_crit is not None and 100 <= int(b_crit.group(1)) <= 160
    assert "bootstrap interval" in text
    assert re.search(r"Batch size \d+ reached the target in the least wall-clock time", text)
    assert re.search(
        r"learning rate that reached the target fastest rises with the batch size: "
        r"below the knee it goes as B\^0\.[3-7]\d",
        text,
    )
    assert re.search(r"consistent with (both linear and square-root|square-root scaling)", text)
    assert re.search(r"B_crit is [\d.]+× B_simple near the target \(95% interval", text)
    assert "gradient noise scale B_simple at the best learning rates was" in text
    assert "Steps to target are interpolated" in text
    assert re.search(r"Best trial: #\d+", text)


def test_trial_table_is_sortable_and_links_to_mlflow(stores: Stores, main_report: Path):
    page = main_report.read_text()
    synthetic = stores.sweeps["main"]

    assert '<table class="sortable">' in page
    run_id = synthetic.run_ids[0]
    assert f'href="http://127.0.0.1:5000/#/experiments/{synthetic.experiment_id}/runs/{run_id}"' in page
    assert page.count("<tr>") >= len(synthetic.run_ids)


def test_summary_markdown_has_the_findings(main_report: Path):
    summary = (main_report.parent / "summary.md").read_text()

    assert summary.startswith("# Batch-size report: main")
    assert "critical batch size is about" in summary
    assert "| batch size | best lr | objective | fastest lr | steps to target |" in summary


def test_store_text_is_escaped(comparison_report: Path):
    page = comparison_report.read_text()
    summary = (comparison_report.parent / "summary.md").read_text()

    assert "<script>alert(1)</script>" not in page
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in summary
    # The only script is the table sorter.
    assert page.count("<script") == 1


def test_comparison_has_a_combined_table_and_a_section_per_study(comparison_report: Path):
    page = comparison_report.read_text()

    assert comparison_report.parent.name.startswith("compare-")
    assert '<h2 id="comparison">Comparison</h2>' in page
    for index in range(2):
        assert f'<h2 id="study-{index}">' in page
    # Both studies' charts plus the comparison chart.
    assert len(IMG.findall(page)) == 2 * len(CHARTS) + 1
    assert "B_crit [95%]" in page


def test_degenerate_studies_say_what_is_missing(comparison_report: Path):
    page = comparison_report.read_text()

    assert "critical batch size cannot be fitted" in page
    assert "no time to target" in page
    for _, data, _ in IMG.findall(page):
        assert base64.b64decode(data).startswith(PNG_MAGIC)


def test_one_trial_study_with_a_traversal_name_as_svg(stores: Stores, tmp_path: Path):
    # "../../etc" has a single trial and a single run: the most degenerate study there is.
    out_dir = tmp_path / "out"
    path = build_report(
        [TRAVERSAL_NAME],
        storage=stores.storage,
        tracking_uri=stores.tracking_uri,
        out_dir=out_dir,
        image_format="svg",
    )

    assert path.parent.parent == out_dir.resolve()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    page = path.read_text()
    assert "../../etc" in page.replace("&#x27;", "'")
    assert "needs completed trials at 3 or more batch sizes; this sweep has 1" in page
    images = IMG.findall(page)
    assert len(images) == len(CHARTS)
    for mime, data, _ in images:
        assert mime == "image/svg+xml"
        assert b"<svg" in base64.b64decode(data)
    # Importances need two completed trials: the Optuna chart says so instead of failing.
    assert "Not enough data" in base64.b64decode(images[-1][1]).decode()


def test_report_from_optuna_alone_draws_empty_states(tmp_path: Path, stores: Stores):
    # No MLflow experiment at all: every chart must still be drawn (strict: no chart may fail).
    storage = make_optuna_only_study(tmp_path / "optuna.journal")
    with pytest.warns(UserWarning, match="No MLflow experiment"):
        sweep = load_sweep("only-optuna", storage=storage, tracking_uri=stores.tracking_uri)

    path = render_report([sweep], out_dir=tmp_path / "out", strict=True, write_images=False)

    page = path.read_text()
    assert len(IMG.findall(page)) == len(CHARTS)
    assert "No trial reached the validation target" in page


def test_two_objective_study_ranks_by_the_first(stores: Stores):
    sweep = _load(stores, "two-objectives")
    result = analyze(sweep)

    assert result.score == "objective"
    assert "1st of 2 objectives" in result.score_label
    assert result.best_trial is not None
    assert result.best_trial["objective"] == sweep.trials["objective"].min()


def test_log_report_artifacts_to_the_parent_run(stores: Stores, main_report: Path):
    run_ids = log_report_artifacts(main_report, ["main"], tracking_uri=stores.tracking_uri)

    assert run_ids == [stores.sweeps["main"].parent_run_id]
    logged = MlflowClient(stores.tracking_uri).list_artifacts(run_ids[0], "report")
    assert sorted(Path(f.path).name for f in logged) == ["index.html", "summary.md"]


def test_bad_arguments(stores: Stores, tmp_path: Path):
    with pytest.raises(TypeError, match="list of study names"):
        build_report("main", storage=stores.storage, tracking_uri=stores.tracking_uri, out_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tracking_ui"):
        render_report([_load(stores, "single")], out_dir=tmp_path, tracking_ui="javascript:alert(1)")


def test_inference_chart_appears_with_a_throughput_run(tmp_path: Path) -> None:
    from mlflow.entities import Metric

    from tests.analysis_tests.conftest import SweepSpec, make_synthetic_sweep

    sweep = make_synthetic_sweep(
        tmp_path / "store", SweepSpec(study_name="infer", batch_sizes=(16, 64), lrs=(0.01, 0.02))
    )
    client = MlflowClient(sweep.tracking_uri)
    run = client.create_run(sweep.experiment_id, tags={"batchscope.role": "throughput"})
    metrics = []
    for i, b in enumerate((1, 16, 256)):
        metrics += [
            Metric("infer/samples_per_s", 1000.0 * b / (1 + i), 0, b),
            Metric("infer/latency_p50_ms", 1.0 + i, 0, b),
            Metric("infer/latency_p95_ms", 1.5 + i, 0, b),
        ]
    client.log_batch(run.info.run_id, metrics=metrics)
    client.set_terminated(run.info.run_id)
    data = load_sweep("infer", storage=sweep.storage, tracking_uri=sweep.tracking_uri)
    assert list(data.throughput["batch_size"]) == [1, 16, 256]
    page = render_report([data], out_dir=tmp_path / "r", strict=True).read_text()
    assert "Inference throughput" in page
    assert len(IMG.findall(page)) == len(CHARTS) + 1
