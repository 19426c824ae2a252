"""Where a simulator turn's seconds go when the simulator runs more sites than threads.

    python benchmarks/site_turn.py RUN_DIR [--imports N]

RUN_DIR: a `flctl simulate ... --threads T` run folder (WORKSPACE/runs/<time>). With fewer threads
than sites, FLARE's simulator starts a new worker process for every turn (one task of one site), so
everything a site builds happens again per turn. From each site's log.txt, per turn:
  start     the previous turn's end on any site -> this worker's first line (process start, the
            simulator's 1 s pause between turns, nvflare's imports)
  app       first line -> the site's set-up begins (FLARE builds the client app: the components'
            imports, torch and pytorch_lightning among them, and syncs with the server)
  setup     the site's own set-up (policy, data, engine, module: SiteExecutor's START_RUN)
  task      the set-up's end -> the task's end
--imports N: also time, in N fresh processes, the imports a site's worker makes, one by one.

With each site's worker kept between its turns (flctl.warm_sites, flctl simulate's default with
fewer threads than sites) a worker starts once per site, so the phases above describe only a
site's first turn; `kept` gives every turn's seconds from the simulator's log instead: from the
runner picking the site (`Simulate Run client: <site>`) to the site's `Finished one task run`.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MARKS = {
    "begin": "ClientTaskWorker started to run",
    "setup_begin": "disclosure policy",  # the executor's first START_RUN line
    "setup_end": " train / ",  # the executor's set-up line
    "end": "Finished one task run",
}
IMPORTS = ("nvflare.private.fed.app.simulator.simulator_worker", "torch", "scipy.signal", "torchvision",
           "torchmetrics", "pytorch_lightning", "fl_lightning_mlflow.site.executor",
           "fl_lightning_mlflow.site.lightning_engine")  # fmt: skip


def when(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def turns(log: Path) -> list:
    """[{mark: time}] per turn of one site, from its log."""
    out, turn = [], None
    for line in log.read_text(errors="replace").splitlines():
        t = when(line)
        if t is None:
            continue
        if MARKS["begin"] in line:
            turn = {"begin": t}
            out.append(turn)
        elif turn is not None:
            for mark in ("setup_begin", "setup_end", "end"):
                if MARKS[mark] in line and mark not in turn:
                    turn[mark] = t
    return [t for t in out if len(t) == 4]


def breakdown(run_dir: Path) -> dict:
    """Median seconds of each phase over all turns of all sites."""
    every = sorted((t for log in sorted(run_dir.glob("simulator/site-*/log.txt")) for t in turns(log)),
                   key=lambda t: t["begin"])  # fmt: skip
    ends = sorted(t["end"] for t in every)
    phases = {"start": [], "app": [], "setup": [], "task": [], "turn": []}
    for t in every:
        before = [e for e in ends if e <= t["begin"]]
        if before:  # the thread's previous turn ended at the latest end before this one began (roughly)
            phases["start"].append(t["begin"] - before[-1])
        phases["app"].append(t["setup_begin"] - t["begin"])
        phases["setup"].append(t["setup_end"] - t["setup_begin"])
        phases["task"].append(t["end"] - t["setup_end"])
        phases["turn"].append(t["end"] - t["begin"])
    return {"turns": len(every), **{k: round(statistics.median(v), 2) for k, v in phases.items() if v}}


PICKED = re.compile(r"Simulate Run client: (\S+) on")
FINISHED = re.compile(r"Finished one task run for client: (\S+) ")


def kept_turns(run_dir: Path) -> dict:
    """Turns, worker starts and the median seconds of a turn, from the simulator's log."""
    picked, seconds = {}, []
    for line in (run_dir / "simulator.log").read_text(errors="replace").splitlines():
        t = when(line)
        if t is None:
            continue
        if m := PICKED.search(line):
            picked[m.group(1)] = t
        elif (m := FINISHED.search(line)) and m.group(1) in picked:
            seconds.append(t - picked.pop(m.group(1)))
    starts = sum(log.read_text(errors="replace").count(MARKS["begin"])
                 for log in run_dir.glob("simulator/site-*/log.txt"))  # fmt: skip
    return {"turns": len(seconds), "worker_starts": starts,
            "turn_median_s": round(statistics.median(seconds), 2) if seconds else None}  # fmt: skip


def import_times(n: int) -> dict:
    """Median seconds of each import, in that order, in n fresh processes."""
    code = ("import importlib, json, sys, time\nout = {}\nfor m in sys.argv[1:]:\n    t = time.perf_counter()\n"
            "    importlib.import_module(m)\n    out[m] = time.perf_counter() - t\nprint(json.dumps(out))")  # fmt: skip
    runs = [json.loads(subprocess.run([sys.executable, "-c", code, *IMPORTS], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(n)]  # fmt: skip
    return {m: round(statistics.median(r[m] for r in runs), 2) for m in IMPORTS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--imports", type=int, default=0)
    args = parser.parse_args(argv)
    result = {"phases_seconds_median": breakdown(args.run_dir), "kept": kept_turns(args.run_dir)}
    if args.imports:
        result["imports_seconds_median"] = import_times(args.imports)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
