"""Run the benchmarks: `python -m benchmarks [--quick] [--only NAME ...] [--write-readme]`.

Sections (in this order): tracking, gns, startup, efficiency, replay, analysis, report, gpu, findings,
frontier. Each prints one table as it finishes; `--write-readme` puts the results into the marked block of
benchmarks/README.md, replacing only the sections that ran.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Section, machine, now_text, quiet, run_section

README = Path(__file__).parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
NAMES = ("tracking", "gns", "startup", "efficiency", "replay", "analysis", "report", "gpu", "findings", "frontier")


def section_function(name: str) -> Callable[[bool], Section]:
    # Imported on demand: `--only analysis` need not import the training code, and so on.
    if name == "tracking":
        from benchmarks.overhead import tracking_section

        return tracking_section
    if name == "gns":
        from benchmarks.overhead import noise_scale_section

        return noise_scale_section
    if name == "startup":
        from benchmarks.startup import startup_section

        return startup_section
    if name == "efficiency":
        from benchmarks.efficiency import efficiency_section

        return efficiency_section
    if name == "replay":
        from benchmarks.efficiency_replay import replay_section

        return replay_section
    if name == "analysis":
        from benchmarks.analysis_scale import analysis_section

        return analysis_section
    if name == "report":
        from benchmarks.report_speed import report_section

        return report_section
    if name == "gpu":
        from benchmarks.gpu import gpu_section

        return gpu_section
    if name == "findings":
        from benchmarks.findings import findings_section

        return findings_section
    if name == "frontier":
        from benchmarks.frontier_replay import frontier_section

        return frontier_section
    raise ValueError(f"unknown section {name!r}; choose from {', '.join(NAMES)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: every section in a few minutes")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run only these: {', '.join(NAMES)}")
    parser.add_argument("--write-readme", action="store_true", help="update the results block of benchmarks/README.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads here and in every process started (OMP_NUM_THREADS); default 1, "
        "since on a loaded 2-core machine two threads make small-model steps erratic (see README)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    # Before torch is imported anywhere, so worker processes started later inherit it too.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    quiet()
    info = machine()
    print(f"# batchscope benchmarks ({'quick' if args.quick else 'full'}), {now_text()}")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- torch threads: {args.threads}; load average now: {os.getloadavg()[0]:.1f}\n", flush=True)
    names = args.only or list(NAMES)
    done: list[Section] = []
    started = time.perf_counter()
    for name in names:
        print(f"... running {name}", file=sys.stderr, flush=True)
        section = run_section(name, section_function(name), args.quick)
        done.append(section)
        print(section.markdown(), flush=True)
    print(f"all done in {time.perf_counter() - started:.0f} s")
    if args.write_readme:
        write_readme(done, info, args.threads)
        print(f"updated {README}")
    return 0


# ---- the README block ------------------------------------------------------------------------


def _block(name: str) -> tuple[str, str]:
    return f"<!-- section:{name}:begin -->", f"<!-- section:{name}:end -->"


def write_readme(sections: list[Section], info: dict[str, str], threads: int) -> None:
    text = README.read_text(encoding="utf-8") if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    blocks = {name: _existing(body, name) for name in NAMES}
    for section in sections:
        blocks[section.name] = section.markdown()
    machine_lines = [
        f"Last updated {now_text()} with `python -m benchmarks` (torch threads: {threads}). Each section says "
        "when it was measured and the machine's load average at the time.",
        "",
        *(f"- **{k}**: {v}" for k, v in info.items()),
    ]
    parts = [BEGIN, "", *machine_lines, "", summary(blocks), ""]
    for name in NAMES:
        if blocks[name]:
            begin, end = _block(name)
            parts += [begin, blocks[name].rstrip(), end, ""]
    README.write_text(head + "\n".join(parts) + END + tail, encoding="utf-8")


def _existing(body: str, name: str) -> str:
    begin, end = _block(name)
    if begin in body and end in body:
        return body.split(begin, 1)[1].split(end, 1)[0].strip() + "\n"
    return ""


def summary(blocks: dict[str, str]) -> str:
    """One line per section, read back from the section blocks (some may come from earlier runs)."""
    rows = ["| section | target | verdict | measured |", "|---|---|---|---|"]
    for name in NAMES:
        block = blocks[name]
        if not block:
            rows.append(f"| {name} | – | not run yet | – |")
            continue
        title = block.splitlines()[0].lstrip("# ").strip()
        found = re.search(r"Target: (.*?)\. \*\*Verdict: (.*?)\.\*\*", block)
        when = re.search(r"_Measured (.*?) \((\w+) mode", block)
        target, verdict = found.groups() if found else ("?", "?")
        measured = f"{when.group(1)} ({when.group(2)})" if when else "?"
        rows.append(f"| {title} | {target} | {verdict} | {measured} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
