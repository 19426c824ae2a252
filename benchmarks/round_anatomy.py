#!/usr/bin/env python3
"""Where a round's seconds go beyond its slowest site's own task, from a simulator run's log.

    python benchmarks/round_anatomy.py RESULTS.json [...]

A round lasts as long as its slowest site's train task (evaluate the global model, train,
validate) plus what the federation adds around it: the time from the last site's result to the
aggregation (the server noticing every site has answered), from the aggregation to the next
round's start (persist, FLARE's per-round memory cleanup), and from that start until the last
site begins the next task (the site's poll for it). Those are read from the log's time stamps, so
they hold whatever the machine's speed at the time, which the rounds / floor ratio does not: the
floor and the job run minutes apart.

For each overhead run in each results file (its "log" folder), adds "round_anatomy" to the run,
recomputes the section's summary and rewrites the file; prints one line per run.
"""

import json
import re
import statistics
import sys
from pathlib import Path

from bench_common import log_time

TOOK = re.compile(r"\[identity=([^,\]]+).*round (\d+): train task took ([\d.]+) s")
STARTS = re.compile(r"\[identity=([^,\]]+).*round (\d+): training starts")
AGGREGATING = re.compile(r"aggregating \d+ update\(s\) at round (\d+)")
ROUND_STARTED = re.compile(r"Round (\d+) started\.")


def anatomy(lines) -> dict:
    """Per round: the slowest site's task seconds, and the three gaps around it (module docstring);
    totals over the rounds, and the seconds of the rounds phase beyond the slowest tasks."""
    took, done, starts, agg, started, first_start = {}, {}, {}, {}, {}, None
    for ln in lines:
        t = log_time(ln)
        if t is None:
            continue
        if m := TOOK.search(ln):
            r = int(m.group(2))
            took[r] = max(took.get(r, 0.0), float(m.group(3)))
            done[r] = max(done.get(r, t), t)
        elif m := STARTS.search(ln):
            r = int(m.group(2))
            starts[r] = max(starts.get(r, t), t)
            first_start = t if first_start is None else min(first_start, t)
        elif m := AGGREGATING.search(ln):
            agg[int(m.group(1))] = t
        elif m := ROUND_STARTED.search(ln):
            started[int(m.group(1))] = t
    rounds = sorted(r for r in took if r in agg)
    if not rounds or first_start is None:
        return {}
    to_aggregation = [agg[r] - done[r] for r in rounds]
    to_next_start = [started[r + 1] - agg[r] for r in rounds if r + 1 in started]
    # round 0's start comes before the sites' processes exist: start-up, not a poll
    to_last_pickup = [starts[r] - started[r] for r in rounds if r in started and r in starts and r - 1 in agg]
    rounds_s = agg[rounds[-1]] - first_start  # as the overhead section's rounds phase: first start, last aggregation
    return {
        "rounds": len(rounds),
        "slowest_task_s": [took[r] for r in rounds],
        "result_to_aggregation_s": to_aggregation,
        "aggregation_to_next_start_s": to_next_start,
        "start_to_last_site_s": to_last_pickup,
        "rounds_s": rounds_s,
        # what the rounds phase holds beyond the slowest site's task in each round
        "beyond_slowest_tasks_s": rounds_s - sum(took[r] for r in rounds),
    }


def run_lines(folder: Path) -> list:
    """Every FLARE log line of a simulator run folder (server and sites)."""
    lines = []
    for log in sorted(folder.glob("simulator/*/log.txt")):
        lines += log.read_text(errors="replace").splitlines()
    return lines


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    for name in argv:
        path = Path(name)
        results = json.loads(path.read_text())
        for i, rep in enumerate(results["overhead"]["repeats"]):
            for kind in ("tracking_on", "tracking_off"):
                run = rep.get(kind)
                if not run or not Path(run["log"]).is_dir():
                    print(f"{path.name} repeat {i + 1} {kind}: no log folder {run and run['log']}")
                    continue
                a = run["round_anatomy"] = anatomy(run_lines(Path(run["log"])))
                if not a:
                    print(f"{path.name} repeat {i + 1} {kind}: no rounds in the log")
                    continue
                print(
                    f"{path.name} repeat {i + 1} {kind}: beyond the slowest tasks {a['beyond_slowest_tasks_s']:.2f} s"
                    f" in {a['rounds']} rounds; result to aggregation median"
                    f" {statistics.median(a['result_to_aggregation_s']):.2f} s, aggregation to next start"
                    f" {statistics.median(a['aggregation_to_next_start_s'] or [0]):.2f} s, start to last site"
                    f" {statistics.median(a['start_to_last_site_s'] or [0]):.2f} s"
                )
        from overhead import summary  # here: overhead imports this module

        results["overhead"]["summary"] = summary(results["overhead"]["repeats"])  # with the new total in it
        path.write_text(json.dumps(results, indent=2) + "\n")  # as run_benchmarks.py writes it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
