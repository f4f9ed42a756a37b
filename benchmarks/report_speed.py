"""The demo's report and the sweep's own imports, by this code and by the code before issue 19's
report work, side by side.

    python -m benchmarks --only report      (or: python -m benchmarks.report_speed)

The demo sweep (`sweeps/configs/mnist1d_demo.yaml`, as `scripts/demo.sh` runs it, with
--no-report) is run once and its stores cached under $BATCHSCOPE_BENCH_CACHE. Then, alternating
in a rotating order, each version runs `batchscope report mnist1d-demo` as a user does (logged to
the sweep's run) on a fresh copy of the stores, then again on the unchanged stores. The "before"
version is commit BEFORE, exported with `git archive` (the repository's `batchscope/` links its
three folders, so PYTHONPATH selects the version). Its `import` of the sweep process's modules is
timed the same way: the part of `batchscope sweep`'s start-up that sweeps/ and analysis/ decide
(torch in the worker is trainers/' and starts in parallel; see section 3).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO, Ratio, Section, cache_root, markdown_table

# main just before this work (issue 19, part 2: the report in seconds).
BEFORE = "240972e3d8468dfd86db0dd4bf9703228979dba0"
DEMO = REPO / "sweeps" / "configs" / "mnist1d_demo.yaml"
STUDY = "mnist1d-demo"
TARGET_S = 3.0
SWEEP_MODULES = "batchscope.sweeps.cli, batchscope.sweeps.commands, batchscope.sweeps.config, batchscope.sweeps.runner"


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float  # of the command's process and its children


def demo_store() -> Path:
    """The demo sweep's stores (mlruns/), run once per config text and torch version."""
    import torch

    key = hashlib.sha256((DEMO.read_text() + torch.__version__).encode()).hexdigest()[:12]
    folder = cache_root() / f"report-demo-{key}"
    if (folder / "done").exists():
        return folder / "mlruns"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, "BATCHSCOPE_ROOT": str(folder / "mlruns")}
    subprocess.run(
        [sys.executable, "-m", "batchscope.sweeps.cli", "sweep", str(DEMO), "--no-report"],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    (folder / "done").write_text("ok\n")
    return folder / "mlruns"


def export_before(into: Path) -> Path:
    """The BEFORE commit's files under `into` (git archive keeps batchscope/'s links)."""
    archive = into / "before.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", BEFORE], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="tar")
    return into / "before"


def _run(argv: list[str], code: Path, cwd: Path) -> Run:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Run(wall, cpu)


def measure(repeats: int) -> dict[str, object]:
    store = demo_store()
    runs: dict[tuple[str, str], list[Run]] = {}
    probes: dict[str, dict[tuple[str, str], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        versions = {"before": export_before(tmp), "after": REPO}
        for i in range(repeats):
            order = list(versions) if i % 2 == 0 else list(versions)[::-1]
            for name in order:
                work = tmp / f"{name}-{i}"
                shutil.copytree(store, work / "mlruns")
                report = ["-m", "batchscope.sweeps.cli", "report", STUDY, "--out", str(work / "reports")]
                runs.setdefault((name, "first"), []).append(_run(report, versions[name], work))
                runs.setdefault((name, "again"), []).append(_run(report, versions[name], work))
                imports = ["-c", f"import {SWEEP_MODULES}"]
                runs.setdefault((name, "imports"), []).append(_run(imports, versions[name], work))
        for i in range(repeats):
            for name in list(versions) if i % 2 == 0 else list(versions)[::-1]:
                work = tmp / f"{name}-probe-{i}"
                shutil.copytree(store, work / "mlruns")
                env = {**os.environ, "PYTHONPATH": str(versions[name]), "OMP_NUM_THREADS": "1"}
                # Run by its path, from the copy's folder: neither puts this checkout's batchscope first on sys.path.
                probe = str(Path(__file__).with_name("report_probe.py"))
                argv = [sys.executable, probe, STUDY, str(work / "mlruns"), str(work / "out")]
                env["BATCHSCOPE_PROBE_LAUNCHED"] = repr(time.time())
                proc = subprocess.run(argv, cwd=work, env=env, check=True, capture_output=True, text=True, timeout=600)
                timed = json.loads(proc.stdout.strip().splitlines()[-1])
                for kind in ("cpu", "wall"):
                    for phase, seconds in timed[kind].items():
                        probes.setdefault(name, {}).setdefault((kind, phase), []).append(seconds)
    return {"runs": runs, "probes": probes, "store": store}


def report_section(quick: bool) -> Section:
    m = measure(2 if quick else 3)
    runs = m["runs"]
    probes = m["probes"]
    assert isinstance(runs, dict) and isinstance(probes, dict)

    def median(name: str, kind: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[(name, kind)])

    def ratio(kind: str, field: str) -> str:
        pairs = zip(runs[("after", kind)], runs[("before", kind)], strict=True)
        return Ratio.of([getattr(a, field) / getattr(b, field) for a, b in pairs]).text()

    labels = {
        "first": "`batchscope report` of the demo, first report (rendered, logged to the sweep's run)",
        "again": "the same, stores unchanged (nothing rendered: report_cache)",
        "imports": f"the sweep process's imports (`import {SWEEP_MODULES}`)",
    }
    rows = []
    for kind, label in labels.items():
        for field, unit in (("wall_s", "wall"), ("cpu_s", "CPU")):
            rows.append(
                (
                    f"{label}, {unit}" if field == "wall_s" else f"  the same, {unit}",
                    f"{median('before', kind, field):.2f} s",
                    f"{median('after', kind, field):.2f} s",
                    ratio(kind, field),
                    f"≤ {TARGET_S:.0f} s" if kind == "first" and field == "wall_s" else "",
                )
            )
    phase_names = list(dict.fromkeys(p for name in ("before", "after") for _, p in probes[name]))
    phase_rows = []
    for phase in phase_names:
        cells = [probes[name].get((kind, phase)) for kind in ("cpu", "wall") for name in ("before", "after")]
        phase_rows.append((phase, *("–" if c is None else f"{statistics.median(c):.2f} s" for c in cells)))
    first_wall, first_cpu = median("after", "first", "wall_s"), median("after", "first", "cpu_s")
    met = first_wall <= TARGET_S
    phase_header = [
        "phase of the first report (benchmarks/report_probe.py)",
        "CPU before",
        "CPU after",
        "wall before",
        "wall after",
    ]
    return Section(
        name="report",
        title="5b. The demo's report, and the sweep's imports: before and after",
        target=f"the first report of the demo sweep in at most {TARGET_S:.0f} s (issue 19)",
        verdict=("met" if met else "missed") + f" ({first_wall:.1f} s wall, {first_cpu:.1f} s CPU)",
        tables=[
            markdown_table(["measure (median)", "before", "after", "after / before (range)", "target"], rows),
            markdown_table(phase_header, phase_rows),
        ],
        notes=[
            f"before: commit {BEFORE[:12]} (main before this work); after: this checkout. "
            f"{3 if not quick else 2} repeats, the versions alternating in a rotating order, each on a fresh copy of "
            f"the demo sweep's stores ({m['store']}).",
            "The phases: median of as many runs, alternating; CPU seconds of the probe's process and of its forked "
            "children (the charts and fANOVA run in forked processes since issue 19's third part, analysis/_fork.py), "
            "and wall seconds. The build_report row is a second, whole render (its files are what is logged), not "
            "part of the first report. The probe times fANOVA alone, before the rest, as the before version runs it; "
            "the after version's `batchscope report` fits it in a forked child while the rest is analysed.",
        ],
    )


if __name__ == "__main__":
    section = report_section("--quick" in sys.argv)
    print(section.markdown())
