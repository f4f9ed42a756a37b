"""The report's headline numbers on real sweeps (real training, real Optuna and MLflow stores),
checked against Optuna's own answer: best trial, objective column, best lr per batch size.

The synthetic stores of conftest.py cannot catch a mix-up between the stores' names (the report
once ranked by final validation loss on every real val_acc sweep), so these run the real thing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from batchscope.analysis.analyze import analyze
from batchscope.analysis.findings import bracket_sentence, per_batch_table
from batchscope.analysis.load import export_sweep, load_sweep
from batchscope.analysis.report import build_report
from batchscope.analysis.text import number
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import run_sweeps, small_config

OBJECTIVES: list[str | list[str]] = [
    "val_acc",
    "val_loss",
    "steps_to_target",
    "time_to_target",
    ["val_acc", "steps_to_target"],
]


def _name(objective: str | list[str]) -> str:
    return "obj-" + ("-".join(objective) if isinstance(objective, list) else objective).replace("_", "")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store with one short real sweep per objective (6 trials each, random sampler)."""
    configs = []
    for objective in OBJECTIVES:
        cfg = small_config(_name(objective))
        cfg["train"].update({"max_steps": 40, "eval_every": 10, "sharpness": {"enabled": False}})
        cfg["train"]["target"] = {"metric": "val/acc", "value": 0.2}
        cfg["search"].update({"n_trials": 6, "objective": objective, "seed": 3})
        cfg["search"]["lr"] = {"low": 0.01, "high": 5.0, "log": True}  # some trials diverge
        configs.append(cfg)
    return run_sweeps(tmp_path_factory.mktemp("objectives"), configs)


def _study(stores: Path, objective: str | list[str]) -> optuna.Study:
    return optuna.load_study(study_name=_name(objective), storage=journal_storage(stores / "mlruns" / "optuna.journal"))


def _load(stores: Path, objective: str | list[str]):
    return load_sweep(
        _name(objective),
        storage=stores / "mlruns" / "optuna.journal",
        tracking_uri=f"sqlite:///{stores / 'mlruns' / 'mlflow.db'}",
    )


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _optuna_best_per_batch(study: optuna.Study) -> dict[int, int]:
    """Batch size -> number of its best completed trial by the first objective, from Optuna alone."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    best: dict[int, optuna.trial.FrozenTrial] = {}
    for t in _complete(study):
        if not math.isfinite(t.values[0]):
            continue
        b = int(t.params["batch_size"])
        if b not in best or (t.values[0] > best[b].values[0] if maximize else t.values[0] < best[b].values[0]):
            best[b] = t
    return {b: t.number for b, t in best.items()}


@pytest.mark.parametrize("objective", OBJECTIVES, ids=_name)
def test_objective_column_is_optunas_value(stores: Path, objective: str | list[str]) -> None:
    # Every trial's objective columns hold exactly Optuna's values (NaN where Optuna has none).
    study, sweep = _study(stores, objective), _load(stores, objective)
    n_objectives = len(study.directions)
    assert sweep.objective_names[0] == (objective[0] if isinstance(objective, list) else objective)
    by_trial = sweep.trials.drop_duplicates("trial").set_index("trial")
    for t in study.trials:
        for i in range(n_objectives):
            column = "objective" if i == 0 else f"objective_{i}"
            got = float(by_trial.loc[t.number, column])
            if t.values is None:
                assert math.isnan(got)
            else:
                assert got == pytest.approx(t.values[i]) or (math.isinf(got) and math.isinf(t.values[i]))


@pytest.mark.parametrize("objective", OBJECTIVES, ids=_name)
def test_best_trial_and_best_lr_per_batch_are_optunas(stores: Path, objective: str | list[str]) -> None:
    study, sweep = _study(stores, objective), _load(stores, objective)
    result = analyze(sweep)
    assert result.score == "objective"
    assert result.best_trial is not None
    best = int(result.best_trial["trial"])
    if len(study.directions) == 1:
        assert best == study.best_trial.number
    else:
        assert best in {t.number for t in study.best_trials}  # on the Pareto front
    assert result.best_trial["state"] == "COMPLETE"
    expected = _optuna_best_per_batch(study)
    got = {int(r.batch_size): int(r.trial) for r in result.best_lr.itertuples()}
    assert got == expected
    for row in result.best_lr.itertuples():
        assert row.lr == pytest.approx(study.trials[int(row.trial)].params["lr"])


@pytest.mark.parametrize("objective", ["val_acc", ["val_acc", "steps_to_target"]], ids=_name)
def test_report_and_export_name_optunas_best(stores: Path, objective: str | list[str], tmp_path: Path) -> None:
    study, sweep = _study(stores, objective), _load(stores, objective)
    best = analyze(sweep).best_trial
    assert best is not None
    index = build_report(
        [_name(objective)],
        storage=stores / "mlruns" / "optuna.journal",
        tracking_uri=f"sqlite:///{stores / 'mlruns' / 'mlflow.db'}",
        out_dir=tmp_path,
        write_images=False,
    )
    summary = (index.parent / "summary.md").read_text()
    name = objective[0] if isinstance(objective, list) else objective
    assert f"Best trial: #{int(best['trial'])}," in summary
    assert f"{name} (maximize" in summary  # the study's objective by name, not a fallback
    paths = export_sweep(sweep, tmp_path / "export", file_format="csv")
    exported = pd.read_csv(paths[0]).drop_duplicates("trial").set_index("trial")
    for t in _complete(study):
        assert exported.loc[t.number, "objective"] == pytest.approx(t.values[0])
    # Parent-run params are kept apart from the trials.
    assert sweep.sweep_params["objective"] == ",".join(objective if isinstance(objective, list) else [objective])
    assert not np.isnan(sweep.trials["objective"].to_numpy(dtype=float)).all()


# --- steps to target, B_crit and the noise scale of a real grid sweep, recomputed from MLflow ---


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3 × 3 grid (batch size × lr) that reaches its target at every batch size."""
    cfg = small_config("grid")
    cfg["train"].update({"max_steps": 150, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["train"]["target"] = {"metric": "val/acc", "value": 0.3}
    cfg["train"]["gns"] = {"every": 2}
    cfg["search"].update({"sampler": "grid", "n_trials": 9, "batch_size": {"values": [16, 64, 256]}})
    cfg["search"]["lr"] = {"values": [0.03, 0.1, 0.3]}
    return run_sweeps(tmp_path_factory.mktemp("grid"), [cfg])


def _grid(grid_store: Path):
    return load_sweep(
        "grid",
        storage=grid_store / "mlruns" / "optuna.journal",
        tracking_uri=f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}",
    )


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_steps_to_target_are_the_crossing_of_the_logged_evaluations(grid_store: Path) -> None:
    # Recomputed by hand from each run's logged val/acc (step 0 included): the last evaluation
    # below the target and the first at or above it, interpolated linearly.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}")
    runs = _grid(grid_store).trials.dropna(subset=["run_id"])
    checked = 0
    for run_id, steps in zip(runs["run_id"], runs["final/steps_to_target"], strict=True):
        history = _history(client, str(run_id), "val/acc")
        assert history[0][0] == 0  # the evaluation at initialization is in the store
        crossed = next((i for i, (_, v) in enumerate(history) if v >= 0.3), None)
        if crossed is None:
            assert math.isnan(steps)
            continue
        (s0, v0), (s1, v1) = history[crossed - 1], history[crossed]
        expected = s0 + (0.3 - v0) / (v1 - v0) * (s1 - s0)
        assert steps == pytest.approx(expected, rel=1e-9)
        checked += 1
    assert checked >= 5


def test_b_crit_matches_an_independent_fit_of_the_stored_runs(grid_store: Path) -> None:
    # The fastest run per batch size straight from the trials table, fitted with scipy's
    # curve_fit on log S = log S_min + log(1 + B_crit/B): the report's grid search agrees.
    from scipy.optimize import curve_fit

    sweep = _grid(grid_store)
    result = analyze(sweep)
    runs = sweep.trials.dropna(subset=["final/steps_to_target"])
    fastest = runs.sort_values("final/steps_to_target").groupby("batch_size").head(1)
    assert len(fastest) == 3 and result.critical_batch is not None
    b = fastest["batch_size"].to_numpy(dtype=float)
    log_s = np.log(fastest["final/steps_to_target"].to_numpy(dtype=float))

    def model(batch: np.ndarray, log_s_min: float, log_b_crit: float) -> np.ndarray:
        return log_s_min + np.log1p(np.exp(log_b_crit) / batch)

    (_, log_b_crit), _ = curve_fit(model, b, log_s, p0=(log_s.min(), np.log(64.0)), maxfev=10_000)
    assert result.critical_batch.b_crit == pytest.approx(np.exp(log_b_crit), rel=0.05)
    assert result.target_reading == "interpolated"


def test_noise_scale_is_the_ratio_of_means_of_the_stored_measurements(grid_store: Path) -> None:
    # Late B_simple of the report, recomputed straight from MLflow: per batch size the mean tr Σ
    # over the mean |G|² of every measurement in the last quarter of its best-lr run (negative |G|²
    # reads included); pooled over batch sizes with inverse-variance weights n_B / Var(|G|² reads).
    from mlflow import MlflowClient

    sweep = _grid(grid_store)
    result = analyze(sweep)
    assert result.noise_scale is not None
    client = MlflowClient(f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}")
    means = {}
    for batch_size, run_ids in result.best_runs.items():
        (run_id,) = run_ids
        g, t = _history(client, run_id, "gns/grad_sq"), _history(client, run_id, "gns/trace_sigma")
        assert [s for s, _ in g] == [s for s, _ in t] and len(g) >= 30  # every second step
        last = g[-1][0]
        late_g = np.array([v for s, v in g if s > 0.75 * last])
        late_t = np.array([v for s, v in t if s > 0.75 * last])
        per_batch = result.noise_scale.per_batch[batch_size]
        assert per_batch.n == late_g.size
        if late_g.mean() > 0:
            assert per_batch.b_simple == pytest.approx(late_t.mean() / late_g.mean(), rel=1e-9)
        means[batch_size] = (late_g.size / late_g.var(ddof=1), late_g.mean(), late_t.mean())
    weights = np.array([w for w, _, _ in means.values()])
    pooled = (weights @ [t for _, _, t in means.values()]) / (weights @ [g for _, g, _ in means.values()])
    late = result.noise_scale.late
    assert late.b_simple == pytest.approx(pooled, rel=1e-9)
    assert late.n == sum(result.noise_scale.per_batch[b].n for b in means)
    assert late.low < late.b_simple and (late.high > late.b_simple)


# --- the frontier as it stands: lr brackets and B_crit against compute, on real sweeps ---


def _expected_kinds(sweep, result) -> dict[int, str]:
    """Each batch size's bracket straight from the trials table: the sorted distinct lrs that
    trained there (ok, pruned or diverged), the report's chosen lr among them and its neighbours."""
    trained = sweep.trials[sweep.trials["status"].isin(["ok", "pruned", "diverged"])]
    kinds = {}
    for b, lr in zip(result.lr_points["batch_size"], result.lr_points["lr"], strict=True):
        here = trained[trained["batch_size"] == b]
        lrs = sorted(set(here["lr"].round(12)))
        i = lrs.index(round(float(lr), 12))
        if len(lrs) == 1:
            kinds[int(b)] = "only"
        elif i == 0:
            kinds[int(b)] = "lowest"
        elif i == len(lrs) - 1:
            kinds[int(b)] = "highest"
        else:
            above = here[here["lr"].round(12) == lrs[i + 1]]
            kinds[int(b)] = "diverged above" if (above["status"] == "diverged").all() else "bracketed"
    return kinds


@pytest.mark.parametrize("store", ["grid", "random"])
def test_lr_brackets_match_the_trials_table(grid_store: Path, stores: Path, store: str) -> None:
    # The grid brackets some optima and leaves others at its edges; the random sweep (lr up to 5)
    # has diverged trials and batch sizes with a single lr.
    sweep = _grid(grid_store) if store == "grid" else _load(stores, "val_acc")
    result = analyze(sweep)
    got = dict(zip(result.lr_brackets["batch_size"].astype(int), result.lr_brackets["kind"], strict=True))
    assert got == _expected_kinds(sweep, result) and got
    assert result.lr_edges == {b: k for b, k in got.items() if k in ("lowest", "highest", "only")}
    table = per_batch_table(result)
    for row in result.lr_brackets.itertuples():
        (cell,) = table.loc[table["batch size"] == row.batch_size, "lr bracket"]
        if row.kind in ("bracketed", "diverged above"):
            assert cell.startswith(f"{number(row.lr_below)} – {number(row.lr_above)}")
        else:
            assert "edge" in cell or "only" in cell
    sentence = bracket_sentence(result)
    assert sentence is not None
    open_ = sorted(b for b, k in got.items() if k in ("lowest", "highest", "only"))
    assert ("not bracketed at batch size" in sentence) == bool(open_)
    for b in open_:
        assert f" {b} (" in sentence


def test_b_crit_against_compute_ends_at_the_reports_b_crit(grid_store: Path) -> None:
    from mlflow import MlflowClient

    sweep = _grid(grid_store)
    result = analyze(sweep)
    progress, fit = result.b_crit_progress, result.critical_batch
    assert fit is not None and not progress.empty, result.b_crit_progress_note
    assert progress["trials"].is_monotonic_increasing and progress["compute"].is_monotonic_increasing
    assert (progress["n_batch_sizes"] >= 3).all()
    last = progress.iloc[-1]
    assert last["trials"] == 9
    assert (last["b_crit"], last["b_crit_low"], last["b_crit_high"]) == (fit.b_crit, fit.b_crit_low, fit.b_crit_high)
    # Compute spent by all 9 trials, from MLflow: each run's last training step × its batch size.
    client = MlflowClient(f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}")
    runs = sweep.trials.dropna(subset=["run_id"])
    spent = sum(
        max(s for s, _ in _history(client, str(r), "train/loss")) * int(b)
        for r, b in zip(runs["run_id"], runs["batch_size"], strict=True)
    )
    assert last["compute"] == pytest.approx(spent, rel=0.02)


def test_report_shows_the_bracket_and_the_b_crit_chart(grid_store: Path, tmp_path: Path) -> None:
    index = build_report(
        ["grid"],
        storage=grid_store / "mlruns" / "optuna.journal",
        tracking_uri=f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}",
        out_dir=tmp_path,
    )
    page = index.read_text()
    summary = (index.parent / "summary.md").read_text()
    assert 'alt="B_crit against compute"' in page
    assert (index.parent / "charts" / "b-crit-progress.png").stat().st_size > 10_000
    # Next to the steps-to-target chart.
    assert page.index('alt="Steps and examples to target"') < page.index('alt="B_crit against compute"')
    assert '<th class="text">lr bracket</th>' in page
    assert "| lr bracket | bracketed |" in summary
    assert "### B_crit against compute" in summary and "| trials completed |" in summary
    fit = analyze(_grid(grid_store)).critical_batch
    assert fit is not None
    assert "| 9 | " in summary and f"| {number(fit.b_crit)} | " in summary


def test_a_report_forked_over_processes_is_the_report_drawn_in_one(
    grid_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first report spreads fANOVA and the charts over forked processes (analysis/_fork.py):
    every chart's bytes, the importances and the page must be those of the one-process report."""
    from batchscope.analysis import _fork

    pages, images, importances = {}, {}, {}
    for processes in ("1", "2"):
        # As many processes whatever threads earlier tests left running (those would turn forking off).
        monkeypatch.setattr(_fork, "processes", lambda count=int(processes): count)
        importances[processes] = analyze(_grid(grid_store)).importances
        index = build_report(
            ["grid"],
            storage=grid_store / "mlruns" / "optuna.journal",
            tracking_uri=f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}",
            out_dir=tmp_path / processes,
        )
        pages[processes] = index.read_text()
        images[processes] = {p.name: p.read_bytes() for p in sorted((index.parent / "charts").iterdir())}
    assert importances["1"] and importances["1"] == importances["2"]
    assert len(images["1"]) >= 7 and images["1"] == images["2"]
    assert pages["1"] == pages["2"]


def test_the_report_of_a_postgresql_study_forks_without_sharing_its_connection(
    grid_store: Path, tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forked processes read a snapshot of the study taken at load time (analysis/load.py),
    never the parent's PostgreSQL connection; the report is the journal's, and the store still
    answers afterwards. The snapshot is what was loaded: a trial added later is not in it."""
    from batchscope.analysis import _fork
    from tests.conftest import PG_ADMIN

    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{pg_database}"
    journal = journal_storage(grid_store / "mlruns" / "optuna.journal")
    optuna.copy_study(from_study_name="grid", from_storage=journal, to_storage=url)
    monkeypatch.setattr(_fork, "processes", lambda: 2)
    tracking = f"sqlite:///{grid_store / 'mlruns' / 'mlflow.db'}"
    pages = {}
    for name, storage in (("journal", grid_store / "mlruns" / "optuna.journal"), ("postgresql", url)):
        index = build_report(["grid"], storage=storage, tracking_uri=tracking, out_dir=tmp_path / name)
        pages[name] = index.read_text()
    assert pages["journal"] == pages["postgresql"]

    sweep = load_sweep("grid", storage=url, tracking_uri=tracking)
    live = optuna.load_study(study_name="grid", storage=url)
    assert [(t.number, t.params, t.values) for t in sweep.study.trials] == [
        (t.number, t.params, t.values) for t in live.trials
    ]
    live.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    assert len(live.trials) == len(sweep.study.trials) + 1
