#!/usr/bin/env python3
"""Benchmarks: overhead against the physical floor, tracking cost, the MLflow write path, accuracy.

    python benchmarks/run_benchmarks.py [--quick] [--out DIR] [--sections overhead,write_path,accuracy,many_sites]

Everything runs here, on generated data in CIFAR-10's layout and the jobs' own model, so every
ratio is measured within one run on one machine. Sections:

  overhead    the same sites' training in parallel plain-Lightning processes (the floor), and
              the default job in the simulator with tracking on and off, interleaved (floor, on,
              floor, off) x repeats, the tracking-on run between two floors (the machine drifts);
              FL wall / floor, where start-up and shutdown go, tracking on / off
  write_path  the server's write path against FLARE's MLflowReceiver, the same stream through
              the same entry point (save) into SQLite, every point counted back, plus a profile;
              then into an mlflow server (4 workers) on PostgreSQL on 127.0.0.1 (needs root),
              or into BENCH_TRACKING_SERVER=http://host:port: a server on cores of its own
  accuracy    FedAvg, FedProx, SCAFFOLD and FedOpt x IID / Dirichlet 0.5 / 0.1 x 3 seeds on the
              hard offline set, one MLflow experiment; centralized training beside them
  many_sites  sites 2, 4, 8, 16 all at once and on 2 simulator threads; at 16 sites, cross-site
              evaluation of every model and of the global models only, and FLARE's own turns
  scaling     sites, rounds and data size (not in the default set: --sections scaling)
  ingest      what the FL server takes in, points/s, with an empty queue and under a backlog
              of a million (not in the default set: --sections ingest)
  flood       one site streams 1.5 million points beside two normal ones, against the same job
              without it (not in the default set: --sections flood)

Results go to --out (default benchmarks/results/<time>): results.json (rewritten after every
step, so a run that stops can be continued with the same --out: finished steps are kept),
summary.md (the tables) and PNG plots. The timing sections want a quiet machine; the accuracy
section does not care. --summary RESULTS_JSON prints the tables of a results file (those kept in
benchmarks/ among them) with today's code, and runs nothing.
"""

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import accuracy
import flood
import ingest
import many_sites
import overhead
import plots
import write_path
from bench_common import REPO, machine, say

SECTIONS = ("overhead", "write_path", "accuracy", "many_sites")
OPTIONAL = ("scaling", "ingest", "flood")


def sections_arg(text: str) -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS + OPTIONAL]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS + OPTIONAL)}")
    return names


def summary_of(path: Path) -> str:
    """The tables of a finished run's results file, as a run prints them at its end, with this code."""
    try:
        text = plots.summary_markdown(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"run_benchmarks: {path} is not a readable results file: {type(e).__name__}: {e}") from None
    if not text.strip():
        raise SystemExit(f"run_benchmarks: {path} holds no finished section of this script's results")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads, one repeat")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<time>)")
    p.add_argument("--sections", type=sections_arg, default=list(SECTIONS), help="comma-separated, default all")
    p.add_argument("--summary", type=Path, metavar="RESULTS_JSON", help="print a results file's tables; run nothing")
    a = p.parse_args(argv)
    if a.summary:
        print(summary_of(a.summary), end="")
        return 0
    out = a.out or REPO / "benchmarks" / "results" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results and results.get("quick") != a.quick:
        kind = "quick" if results.get("quick") else "full"
        raise SystemExit(f"run_benchmarks: {results_file} holds a {kind} run; use another --out")
    results["quick"] = a.quick
    results.setdefault("machine", machine())
    results.setdefault("started", {})

    def save():
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    say(f"benchmarks {'quick' if a.quick else 'full'} -> {out}; sections {', '.join(a.sections)}")
    for i, name in enumerate(a.sections, start=1):
        say(f"{i}/{len(a.sections)} {name}")
        results["started"].setdefault(name, datetime.now().isoformat(timespec="seconds"))
        section = results.setdefault(name, {})
        if name == "overhead":
            overhead.run(work, a.quick, section, save)
        elif name == "write_path":
            write_path.run(work, a.quick, section, save)
        elif name == "accuracy":
            accuracy.run(work, a.quick, section, save)
        elif name == "many_sites":
            many_sites.run(work, a.quick, section, save)
        elif name == "scaling":
            overhead.scaling(work, a.quick, section, save)
        elif name == "ingest":
            ingest.run(work, a.quick, section, save)
        elif name == "flood":
            flood.run(work, a.quick, section, save)
        save()
    text = plots.summary_markdown(results)
    (out / "summary.md").write_text(text)
    plots.all_plots(results, out)
    print()
    print(text)
    say(f"results: {results_file}; tables: {out / 'summary.md'}; plots: {out}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
